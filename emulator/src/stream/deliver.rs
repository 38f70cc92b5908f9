//! One frame delivered to one filter: its context created on first use, the
//! header maps and body it may touch opened for the callback, Continue or
//! Pause applied, a local reply taking precedence, a failed VM answered.

use super::engine::{Engine, Frame, Stop};
use super::{Access, Callback, Direction, Op, TraceEntry};
use crate::plugin::FailurePolicy;
use crate::vm::{HttpCallback, StreamLink};

impl Engine {
    /// Makes sure the filter has a context on this stream. `false` when its
    /// VM has failed (the failure is handled here).
    pub(super) fn ensure_context(&mut self, filter: usize, dir: Direction) -> bool {
        if self.ctx[filter].is_some() {
            return true;
        }
        let link = StreamLink {
            stream: self.shared.clone(),
            filter,
        };
        let r = {
            let mut vm = self.plugins[filter].lock_vm(self.worker);
            vm.create_context(link)
        };
        self.trace.push(TraceEntry {
            filter,
            callback: Callback::ContextCreate,
            continued: None,
        });
        match r {
            Ok(id) => {
                self.ctx[filter] = Some(id);
                true
            }
            Err(()) => {
                self.vm_failed(filter, dir);
                false
            }
        }
    }

    /// Envoy's answer to a failed VM: a 503 local reply (fail closed) or the
    /// filter skipped (fail open).
    pub(super) fn vm_failed(&mut self, filter: usize, _dir: Direction) {
        self.skipped[filter] = true;
        let policy = self.plugins[filter].lock_vm(self.worker).policy();
        if policy == FailurePolicy::FailClosed {
            self.local_reply(
                filter,
                503,
                "wasm_fail_stream".into(),
                Vec::new(),
                Vec::new(),
                Some(14),
            );
        }
    }

    pub(super) fn deliver(&mut self, dir: Direction, pos: usize, frame: Frame) {
        let filter = self.pos_of(dir, pos);
        if self.skipped[filter] {
            self.forward(dir, pos, frame);
            return;
        }
        // Filters first reached on the response path (a local reply from an
        // earlier filter) have their context created there too.
        if !self.ensure_context(filter, dir) {
            if self.skipped[filter] && !self.dirs[dir.index()].halted {
                self.forward(dir, pos, frame);
            }
            return;
        }
        let ctx = self.ctx[filter].unwrap_or(0);
        let d = dir.index();
        let (hi, ti) = if dir == Direction::Request {
            (0, 1)
        } else {
            (2, 3)
        };
        let (cb, tcb, arg, eos) = match &frame {
            Frame::Headers { eos } => {
                self.dirs[d].slots[pos].headers_eos = *eos;
                self.set_access(filter, |a| {
                    a.read[hi] = true;
                    a.write[hi] = true;
                });
                let n = self.shared.lock().maps[hi].as_ref().map_or(0, |m| m.len());
                let cb = if d == 0 {
                    HttpCallback::RequestHeaders
                } else {
                    HttpCallback::ResponseHeaders
                };
                let t = if d == 0 {
                    Callback::RequestHeaders
                } else {
                    Callback::ResponseHeaders
                };
                (cb, t, n as i32, Some(*eos))
            }
            Frame::Data { bytes, eos } => {
                let len = {
                    let mut s = self.shared.lock();
                    s.bodies[filter][d].extend_from_slice(bytes);
                    let no_trailers = s.maps[ti].is_none();
                    let a = &mut s.access[filter];
                    a.body[d] = true;
                    // Trailers may be added from the last chunk when there are none.
                    a.create[ti] = *eos && no_trailers;
                    s.bodies[filter][d].len()
                };
                if *eos {
                    self.dirs[d].slots[pos].body_eos = true;
                }
                let cb = if d == 0 {
                    HttpCallback::RequestBody
                } else {
                    HttpCallback::ResponseBody
                };
                let t = if d == 0 {
                    Callback::RequestBody
                } else {
                    Callback::ResponseBody
                };
                (cb, t, len as i32, Some(*eos))
            }
            Frame::Trailers => {
                self.set_access(filter, |a| {
                    a.read[ti] = true;
                    a.write[ti] = true;
                });
                let n = self.shared.lock().maps[ti].as_ref().map_or(0, |m| m.len());
                let cb = if d == 0 {
                    HttpCallback::RequestTrailers
                } else {
                    HttpCallback::ResponseTrailers
                };
                let t = if d == 0 {
                    Callback::RequestTrailers
                } else {
                    Callback::ResponseTrailers
                };
                (cb, t, n as i32, None)
            }
        };
        let (result, ops) = {
            let mut vm = self.plugins[filter].lock_vm(self.worker);
            let r = vm.http(cb, ctx, arg, eos);
            (r, vm.take_ops())
        };
        let Ok(continued) = result else {
            self.trace.push(TraceEntry {
                filter,
                callback: tcb,
                continued: None,
            });
            self.set_access(filter, |a| *a = Access::default());
            self.vm_failed(filter, dir);
            if self.skipped[filter] && !self.dirs[d].halted && !self.finished {
                // Fail open: the frame goes on as if the filter were not there.
                let frame = match frame {
                    Frame::Data { eos, .. } => {
                        let bytes = std::mem::take(&mut self.shared.lock().bodies[filter][d]);
                        Frame::Data { bytes, eos }
                    }
                    f => f,
                };
                self.forward(dir, pos, frame);
            }
            return;
        };
        self.trace.push(TraceEntry {
            filter,
            callback: tcb,
            continued: Some(continued),
        });
        // A local reply forces this callback's result to Stop.
        // Once a reply is under way, later ones are ignored.
        let replying = self.local_reply.is_some();
        let (replies, rest): (Vec<_>, Vec<_>) = ops.into_iter().partition(|(id, op)| {
            *id == self.shared.id && matches!(op, Op::LocalReply { .. }) && !replying
        });
        if let Some((_, op)) = replies.into_iter().next() {
            self.set_access(filter, |a| *a = Access::default());
            self.apply(op, Some(dir));
            self.route_ops(rest);
            return;
        }
        let slot_stop;
        match frame {
            Frame::Headers { eos } => {
                if continued {
                    self.set_access(filter, |a| {
                        a.read[hi] = false;
                        a.write[hi] = false;
                    });
                    self.forward(dir, pos, Frame::Headers { eos });
                    slot_stop = Stop::None;
                } else {
                    slot_stop = Stop::Headers;
                }
            }
            Frame::Data { eos, .. } => {
                if continued {
                    let (bytes, added_trailers) = {
                        let mut s = self.shared.lock();
                        let added = s.access[filter].create[ti] && s.maps[ti].is_some();
                        s.access[filter].body[d] = false;
                        s.access[filter].create[ti] = false;
                        (std::mem::take(&mut s.bodies[filter][d]), added)
                    };
                    if added_trailers {
                        // Trailers added from the last chunk follow the data.
                        self.forward(dir, pos, Frame::Data { bytes, eos: false });
                        self.forward(dir, pos, Frame::Trailers);
                    } else {
                        self.forward(dir, pos, Frame::Data { bytes, eos });
                    }
                    slot_stop = Stop::None;
                } else {
                    slot_stop = Stop::Body;
                }
            }
            Frame::Trailers => {
                if continued {
                    self.set_access(filter, |a| {
                        a.read[ti] = false;
                        a.write[ti] = false;
                    });
                    self.flush_body(dir, pos, filter, false);
                    self.forward(dir, pos, Frame::Trailers);
                    slot_stop = Stop::None;
                } else {
                    slot_stop = Stop::Trailers;
                }
            }
        }
        self.dirs[d].slots[pos].stop = slot_stop;
        self.route_ops(rest);
    }

    /// Sends on the body buffered at a filter (after a body Pause).
    pub(super) fn flush_body(&mut self, dir: Direction, pos: usize, filter: usize, eos: bool) {
        let d = dir.index();
        let bytes = {
            let mut s = self.shared.lock();
            s.access[filter].body[d] = false;
            std::mem::take(&mut s.bodies[filter][d])
        };
        if !bytes.is_empty() || eos {
            self.forward(dir, pos, Frame::Data { bytes, eos });
        }
    }
}
