//! One stream's state in the filter manager, and its iteration: frames in
//! from the client or the upstream, queued per filter, delivered in chain
//! order (responses in reverse), and out to the upstream or the client.

use super::{Access, Direction, LocalReply, Message, Responder, StreamShared, TraceEntry};
use crate::abi::Pairs;
use crate::host::Host;
use crate::plugin::PluginInner;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum Stop {
    #[default]
    None,
    Headers,
    Body,
    Trailers,
}

#[derive(Debug)]
pub(super) enum Frame {
    Headers { eos: bool },
    Data { bytes: Vec<u8>, eos: bool },
    Trailers,
}

#[derive(Default)]
pub(super) struct Slot {
    pub(super) queue: VecDeque<Frame>,
    pub(super) stop: Stop,
    pub(super) headers_eos: bool,
    pub(super) body_eos: bool,
}

#[derive(Default)]
pub(super) struct DirState {
    pub(super) slots: Vec<Slot>,
    pub(super) halted: bool,
    pub(super) ended: bool,
}

pub(super) struct Engine {
    pub(super) host: Host,
    pub(super) shared: Arc<StreamShared>,
    pub(super) plugins: Vec<Arc<PluginInner>>,
    pub(super) upstream_responder: Option<Responder>,
    pub(super) worker: usize,
    pub(super) ctx: Vec<Option<u32>>,
    pub(super) skipped: Vec<bool>,
    pub(super) dirs: [DirState; 2],
    pub(super) upstream: Option<Message>,
    pub(super) downstream: Option<Message>,
    pub(super) local_reply: Option<LocalReply>,
    /// Upstream response headers entered the encoder chain.
    pub(super) response_started: bool,
    pub(super) reset: bool,
    pub(super) finished: bool,
    pub(super) trace: Vec<TraceEntry>,
}

pub(crate) struct StreamCell {
    pub(super) engine: Mutex<Engine>,
}

impl StreamCell {
    pub(super) fn lock(&self) -> MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Engine {
    pub(super) fn n(&self) -> usize {
        self.plugins.len()
    }

    pub(super) fn filter_of(&self, dir: Direction, pos: usize, n: usize) -> usize {
        match dir {
            Direction::Request => pos,
            Direction::Response => n - 1 - pos,
        }
    }

    pub(super) fn pos_of(&self, dir: Direction, filter: usize) -> usize {
        self.filter_of(dir, filter, self.n())
    }

    pub(super) fn headers_in(&mut self, dir: Direction, headers: Arc<Pairs>, eos: bool) {
        if self.finished || self.dirs[dir.index()].halted {
            return;
        }
        let i = if dir == Direction::Request { 0 } else { 2 };
        self.response_started |= dir == Direction::Response;
        self.shared.lock().maps[i] = Some(headers);
        self.input(dir, Frame::Headers { eos });
    }

    pub(super) fn data_in(&mut self, dir: Direction, bytes: Vec<u8>, eos: bool) {
        if dir == Direction::Request {
            // Envoy counts what the client sent as it arrives, before the
            // filter chain (and whether the request is still processed).
            self.shared.lock().bytes_received += bytes.len() as u64;
        }
        if self.finished || self.dirs[dir.index()].halted {
            return;
        }
        self.input(dir, Frame::Data { bytes, eos });
    }

    pub(super) fn trailers_in(&mut self, dir: Direction, trailers: Pairs) {
        if self.finished || self.dirs[dir.index()].halted {
            return;
        }
        let i = if dir == Direction::Request { 1 } else { 3 };
        self.shared.lock().maps[i] = Some(Arc::new(trailers));
        self.input(dir, Frame::Trailers);
    }

    pub(super) fn input(&mut self, dir: Direction, frame: Frame) {
        if self.n() == 0 {
            self.output(dir, frame);
        } else {
            push(&mut self.dirs[dir.index()].slots[0].queue, frame);
            self.pump(dir);
        }
    }

    pub(super) fn pump(&mut self, dir: Direction) {
        self.pump_from(dir, 0);
    }

    /// Delivers queued frames, filters from position `start` on, until none can move.
    pub(super) fn pump_from(&mut self, dir: Direction, start: usize) {
        loop {
            let mut progressed = false;
            for pos in start..self.n() {
                loop {
                    if self.finished || self.dirs[dir.index()].halted {
                        return;
                    }
                    let slot = &mut self.dirs[dir.index()].slots[pos];
                    if matches!(slot.stop, Stop::Headers | Stop::Trailers) {
                        break;
                    }
                    let Some(frame) = slot.queue.pop_front() else {
                        break;
                    };
                    progressed = true;
                    self.deliver(dir, pos, frame);
                }
            }
            if !progressed {
                return;
            }
        }
    }

    pub(super) fn forward(&mut self, dir: Direction, pos: usize, frame: Frame) {
        if pos + 1 >= self.n() {
            self.output(dir, frame);
        } else {
            push(&mut self.dirs[dir.index()].slots[pos + 1].queue, frame);
        }
    }

    /// A frame passed the last filter: to the upstream, or to the client.
    pub(super) fn output(&mut self, dir: Direction, frame: Frame) {
        let (hi, ti) = if dir == Direction::Request {
            (0, 1)
        } else {
            (2, 3)
        };
        let snapshot = |s: &Arc<StreamShared>, i: usize| s.lock().maps[i].clone();
        let copy = |s: &Arc<StreamShared>, i: usize| s.lock().maps[i].as_deref().cloned();
        let msg = match dir {
            Direction::Request => &mut self.upstream,
            Direction::Response => &mut self.downstream,
        };
        let eos = match frame {
            Frame::Headers { eos } => {
                *msg = Some(Message {
                    headers: snapshot(&self.shared, hi).unwrap_or_default(),
                    ..Message::default()
                });
                eos
            }
            Frame::Data { bytes, eos } => {
                if let Some(m) = msg.as_mut() {
                    m.body.extend_from_slice(&bytes);
                    if dir == Direction::Response {
                        // Body bytes the client received (`bytesSent`),
                        // a local reply's body sent through the encoders included.
                        self.shared.lock().bytes_sent += bytes.len() as u64;
                    }
                }
                eos
            }
            Frame::Trailers => {
                if let Some(m) = msg.as_mut() {
                    m.trailers = copy(&self.shared, ti);
                }
                true
            }
        };
        if !eos {
            return;
        }
        self.dirs[dir.index()].ended = true;
        match dir {
            Direction::Request => {
                if let (Some(up), Some(req)) =
                    (self.upstream_responder.clone(), self.upstream.clone())
                {
                    if self.downstream.is_none() && !self.dirs[1].halted {
                        let resp = up(&req);
                        self.headers_in(
                            Direction::Response,
                            resp.headers,
                            resp.body.is_empty() && resp.trailers.is_none(),
                        );
                        if !resp.body.is_empty() {
                            self.data_in(Direction::Response, resp.body, resp.trailers.is_none());
                        }
                        if let Some(t) = resp.trailers {
                            self.trailers_in(Direction::Response, t);
                        }
                    }
                }
            }
            Direction::Response => self.finish(),
        }
    }

    pub(super) fn set_access(&self, filter: usize, f: impl FnOnce(&mut Access)) {
        let mut d = self.shared.lock();
        f(&mut d.access[filter]);
    }
}

pub(super) fn push(q: &mut VecDeque<Frame>, frame: Frame) {
    // Data arriving while a filter is stopped is buffered as one chunk.
    if let (Some(Frame::Data { bytes: b, eos: e }), Frame::Data { bytes, eos }) =
        (q.back_mut(), &frame)
    {
        b.extend_from_slice(bytes);
        *e |= *eos;
        return;
    }
    q.push_back(frame);
}
