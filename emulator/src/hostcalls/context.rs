//! Logs (`proxy_log`, the `wasm` logger level), the clock, the root's tick
//! timer, the effective context, and the imports Envoy answers without
//! acting (`proxy_call_foreign_function`, `proxy_done`).

use super::{ok, read_string, st, write, write_u32, C};
use crate::abi::Status;
use crate::host::{EventKind, LogLevel};
use crate::vm::VmState;
use wasmtime::{Linker, Result};

pub(super) fn add_to_linker(l: &mut Linker<VmState>) -> Result<()> {
    l.func_wrap(
        "env",
        "proxy_log",
        |mut c: C<'_>, level: i32, p: i32, n: i32| -> Result<i32> {
            let msg = read_string(&mut c, p, n)?;
            let Some(level) = LogLevel::from_i32(level) else {
                return st(Status::BadArgument);
            };
            c.data().log(level, msg);
            ok()
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_log_level",
        |mut c: C<'_>, out: i32| -> Result<i32> {
            let lvl = c.data().core.settings.log_level as u32;
            write_u32(&mut c, out, lvl)?;
            ok()
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut c: C<'_>, out: i32| -> Result<i32> {
            let now = c.data().core.lock().now();
            write(&mut c, out, &now.to_le_bytes())?;
            ok()
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut c: C<'_>, ms: i32| -> Result<i32> {
            let st = c.data_mut();
            if st.core.settings.profile.strict() {
                // The stricter hosts set a period once per root context.
                if st.effective != st.root_id {
                    wasmtime::bail!(
                        "proxy_set_tick_period_milliseconds: can only set tick_period in root context (strict profile)"
                    );
                }
                if st.tick_period_ns > 0 {
                    wasmtime::bail!(
                        "proxy_set_tick_period_milliseconds: tick_period already set (strict profile)"
                    );
                }
            }
            st.tick_generation += 1;
            st.tick_period_ns = u64::from(ms as u32) * 1_000_000;
            if st.tick_period_ns > 0 {
                let (plugin, worker, root, generation) =
                    (st.plugin, st.worker_key(), st.root_id, st.tick_generation);
                let period = st.tick_period_ns;
                st.core.lock().schedule(
                    period,
                    EventKind::Tick {
                        plugin,
                        worker,
                        root,
                        generation,
                    },
                );
            }
            ok()
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_effective_context",
        |mut c: C<'_>, id: i32| -> Result<i32> {
            let id = id as u32;
            let st_ = c.data_mut();
            if id == st_.root_id || st_.streams.iter().any(|(i, _)| *i == id) {
                st_.effective = id;
                ok()
            } else {
                st(Status::BadArgument)
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |_c: C<'_>, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32| -> Result<i32> {
            st(Status::NotFound)
        },
    )?;
    l.func_wrap("env", "proxy_done", |_c: C<'_>| -> Result<i32> { ok() })?;
    Ok(())
}
