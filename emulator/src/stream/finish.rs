//! The end of a stream: `on_log` for every filter (contexts created for
//! those the request never reached), then `on_done` and `on_delete`.

use super::engine::Engine;
use super::{Access, Callback, TraceEntry};
use crate::vm::StreamLink;

impl Engine {
    /// `on_log` for every filter with a context (in chain order, with the
    /// headers readable again), then `on_done` and `on_delete` for each.
    pub(super) fn finish(&mut self) {
        if self.finished {
            return;
        }
        // Envoy's `onRequestComplete`: the end time `request.duration` reads.
        let end_ns = self.host.inner.core.lock().now();
        self.shared.lock().end_ns = Some(end_ns);
        self.finished = true;
        self.dirs[0].halted = true;
        self.dirs[1].halted = true;
        let n = self.n();
        {
            let mut s = self.shared.lock();
            s.in_log = true;
            for a in s.access.iter_mut() {
                *a = Access {
                    read: [true; 4],
                    ..Access::default()
                };
            }
        }
        for f in 0..n {
            // Envoy's Context::log creates the context of a filter the
            // request never reached, so every filter logs.
            if self.ctx[f].is_none() && self.plugins[f].lock_vm(self.worker).failed().is_none() {
                let link = StreamLink {
                    stream: self.shared.clone(),
                    filter: f,
                };
                let r = self.plugins[f].lock_vm(self.worker).create_context(link);
                self.trace.push(TraceEntry {
                    filter: f,
                    callback: Callback::ContextCreate,
                    continued: None,
                });
                if let Ok(id) = r {
                    self.ctx[f] = Some(id);
                }
            }
            let Some(ctx) = self.ctx[f] else { continue };
            let r = self.plugins[f].lock_vm(self.worker).on_log(ctx);
            if r.is_ok() {
                self.trace.push(TraceEntry {
                    filter: f,
                    callback: Callback::Log,
                    continued: None,
                });
            }
        }
        {
            let mut s = self.shared.lock();
            for a in s.access.iter_mut() {
                *a = Access::default();
            }
        }
        for f in 0..n {
            let Some(ctx) = self.ctx[f] else { continue };
            let ops = {
                let mut vm = self.plugins[f].lock_vm(self.worker);
                vm.finish(ctx);
                vm.take_ops()
            };
            drop(ops);
            self.trace.push(TraceEntry {
                filter: f,
                callback: Callback::Done,
                continued: None,
            });
        }
    }
}
