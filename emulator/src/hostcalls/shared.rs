//! Shared data per VM id with Envoy's CAS rules (or the strict profile's),
//! and shared queues whose `on_queue_ready` goes to the latest registrant.

use super::{give, ok, read, read_string, st, write_u32, C};
use crate::abi::Status;
use crate::host::{EventKind, Queue, SharedEntry};
use crate::vm::VmState;
use wasmtime::{Linker, Result};

pub(super) fn add_to_linker(l: &mut Linker<VmState>) -> Result<()> {
    l.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut c: C<'_>, kp: i32, kl: i32, pp: i32, pn: i32, pcas: i32| -> Result<i32> {
            let key = read_string(&mut c, kp, kl)?;
            let vm_id = c.data().meta.vm_id.clone();
            let found = {
                let s = c.data().core.lock();
                s.shared_data
                    .get(&(vm_id, key))
                    .map(|e| (e.value.clone(), e.cas))
            };
            match found {
                Some((v, cas)) => {
                    give(&mut c, &v, pp, pn)?;
                    write_u32(&mut c, pcas, cas)?;
                    ok()
                }
                None => st(Status::NotFound),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut c: C<'_>, kp: i32, kl: i32, vp: i32, vl: i32, cas: i32| -> Result<i32> {
            let key = read_string(&mut c, kp, kl)?;
            let value = read(&mut c, vp, vl)?;
            let vm_id = c.data().meta.vm_id.clone();
            let cas = cas as u32;
            let strict = c.data().core.settings.profile.strict();
            let mut s = c.data().core.lock();
            let k = (vm_id, key);
            let current = s.shared_data.get(&k).map(|e| e.cas);
            let refused = if strict {
                // Only the current CAS, or 0 for an absent key.
                cas != current.unwrap_or(0)
            } else {
                current.is_some_and(|c| cas != 0 && cas != c)
            };
            if refused {
                return st(Status::CasMismatch);
            }
            let new_cas = s.next_cas();
            s.shared_data.insert(
                k,
                SharedEntry {
                    value,
                    cas: new_cas,
                },
            );
            ok()
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_register_shared_queue",
        |mut c: C<'_>, np: i32, nl: i32, out: i32| -> Result<i32> {
            let name = read_string(&mut c, np, nl)?;
            let st_ = c.data();
            let owner = st_.worker.map(|w| (st_.plugin, w, st_.root_id));
            let vm_id = st_.meta.vm_id.clone();
            let token = {
                let mut s = st_.core.lock();
                let key = (vm_id, name);
                match s.queue_names.get(&key).copied() {
                    Some(t) => {
                        if let Some(q) = s.queues.get_mut(&t) {
                            q.owner = owner;
                        }
                        t
                    }
                    None => {
                        let t = s.next_queue;
                        s.next_queue += 1;
                        s.queue_names.insert(key, t);
                        s.queues.insert(
                            t,
                            Queue {
                                items: Default::default(),
                                owner,
                            },
                        );
                        t
                    }
                }
            };
            write_u32(&mut c, out, token)?;
            ok()
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_resolve_shared_queue",
        |mut c: C<'_>, vp: i32, vl: i32, np: i32, nl: i32, out: i32| -> Result<i32> {
            let vm_id = read_string(&mut c, vp, vl)?;
            let name = read_string(&mut c, np, nl)?;
            let t = c
                .data()
                .core
                .lock()
                .queue_names
                .get(&(vm_id, name))
                .copied();
            match t {
                Some(t) => {
                    write_u32(&mut c, out, t)?;
                    ok()
                }
                None => st(Status::NotFound),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_enqueue_shared_queue",
        |mut c: C<'_>, id: i32, vp: i32, vl: i32| -> Result<i32> {
            let value = read(&mut c, vp, vl)?;
            let mut s = c.data().core.lock();
            let Some(q) = s.queues.get_mut(&(id as u32)) else {
                return st(Status::NotFound);
            };
            q.items.push_back(value);
            if let Some((plugin, worker, root)) = q.owner {
                s.schedule(
                    0,
                    EventKind::QueueReady {
                        plugin,
                        worker,
                        root,
                        queue: id as u32,
                    },
                );
            }
            ok()
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_dequeue_shared_queue",
        |mut c: C<'_>, id: i32, pp: i32, pn: i32| -> Result<i32> {
            let item = {
                let mut s = c.data().core.lock();
                let Some(q) = s.queues.get_mut(&(id as u32)) else {
                    return st(Status::NotFound);
                };
                q.items.pop_front()
            };
            match item {
                Some(v) => {
                    give(&mut c, &v, pp, pn)?;
                    ok()
                }
                None => st(Status::Empty),
            }
        },
    )?;
    Ok(())
}
