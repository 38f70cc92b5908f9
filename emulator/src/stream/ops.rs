//! Operations callbacks queue (`proxy_continue_stream`, `proxy_close_stream`,
//! `proxy_send_local_response`), applied after the callback returns; those
//! for another stream are scheduled as events.

use super::engine::{Engine, Frame, Stop};
use super::{Direction, Op};

impl Engine {
    pub(super) fn route_ops(&mut self, ops: Vec<(u64, Op)>) {
        for (id, op) in ops {
            if id == self.shared.id {
                self.apply(op, None);
            } else {
                self.host
                    .inner
                    .core
                    .lock()
                    .schedule(0, crate::host::EventKind::StreamOp { stream: id, op });
            }
        }
    }

    pub(super) fn apply(&mut self, op: Op, during: Option<Direction>) {
        if self.finished {
            return;
        }
        match op {
            Op::Continue(dir, filter) => self.resume(dir, filter),
            Op::Close => {
                self.reset = true;
                self.finish();
            }
            Op::LocalReply {
                filter,
                status,
                details,
                body,
                headers,
                grpc_status,
            } => {
                let _ = during;
                self.local_reply(filter, status, details, body, headers, grpc_status);
            }
        }
    }

    pub(super) fn resume(&mut self, dir: Direction, filter: usize) {
        let d = dir.index();
        if self.dirs[d].halted || filter >= self.n() {
            return;
        }
        let pos = self.pos_of(dir, filter);
        let (hi, ti) = if dir == Direction::Request {
            (0, 1)
        } else {
            (2, 3)
        };
        let stop = std::mem::take(&mut self.dirs[d].slots[pos].stop);
        match stop {
            Stop::None => return,
            Stop::Headers => {
                self.set_access(filter, |a| {
                    a.read[hi] = false;
                    a.write[hi] = false;
                });
                let eos = self.dirs[d].slots[pos].headers_eos;
                self.forward(dir, pos, Frame::Headers { eos });
            }
            Stop::Body => {
                let eos = self.dirs[d].slots[pos].body_eos
                    && !self.dirs[d].slots[pos]
                        .queue
                        .iter()
                        .any(|f| matches!(f, Frame::Trailers));
                self.set_access(filter, |a| a.create[ti] = false);
                self.flush_body(dir, pos, filter, eos);
            }
            Stop::Trailers => {
                self.set_access(filter, |a| {
                    a.read[ti] = false;
                    a.write[ti] = false;
                });
                self.flush_body(dir, pos, filter, false);
                self.forward(dir, pos, Frame::Trailers);
            }
        }
        // As Envoy's iterate_from_current_filter: what was released goes on
        // through the later filters first, then the resumed filter gets the
        // data that was buffered for it while it was stopped.
        self.pump_from(dir, pos + 1);
        self.pump(dir);
    }
}
