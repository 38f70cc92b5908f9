//! The WASI preview1 calls a Rust filter makes, answered as Envoy answers
//! them (proxy-wasm-cpp-host `exports.cc`): stdout and stderr go to the log
//! at info and error, the environment is the VM's, there are no arguments
//! and no files, clocks come from the host clock, randomness from the host.

use crate::host::LogLevel;
use crate::hostcalls::{read, write};
use crate::vm::VmState;
use wasmtime::{Caller, Linker, Result};

type C<'a> = Caller<'a, VmState>;

const M: &str = "wasi_snapshot_preview1";
const ESUCCESS: i32 = 0;
const EBADF: i32 = 8;
const EINVAL: i32 = 28;
const ENOTSUP: i32 = 58;
/// Envoy refuses `random_get` above this (limits.h).
const MAX_RANDOM: usize = 64 * 1024;

fn u32_at(c: &mut C<'_>, ptr: i32, value: u32) -> Result<()> {
    write(c, ptr, &value.to_le_bytes())
}

fn environ(c: &C<'_>) -> Vec<Vec<u8>> {
    c.data()
        .meta
        .env
        .iter()
        .map(|(k, v)| {
            let mut e = format!("{k}={v}").into_bytes();
            e.push(0);
            e
        })
        .collect()
}

pub(crate) fn add_to_linker(l: &mut Linker<VmState>) -> Result<()> {
    l.func_wrap(
        M,
        "fd_write",
        |mut c: C<'_>, fd: i32, iovs: i32, n: i32, out: i32| -> Result<i32> {
            let level = match fd {
                1 => LogLevel::Info,
                2 => LogLevel::Error,
                _ => return Ok(EBADF),
            };
            let mut msg = Vec::new();
            for i in 0..n.max(0) {
                let iov = read(&mut c, iovs + i * 8, 8)?;
                let p = u32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
                let len = u32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
                msg.extend(read(&mut c, p as i32, len as i32)?);
            }
            let written = msg.len() as u32;
            if msg.last() == Some(&b'\n') {
                msg.pop();
            }
            c.data()
                .log(level, String::from_utf8_lossy(&msg).into_owned());
            u32_at(&mut c, out, written)?;
            Ok(ESUCCESS)
        },
    )?;
    l.func_wrap(
        M,
        "environ_sizes_get",
        |mut c: C<'_>, count: i32, size: i32| -> Result<i32> {
            let env = environ(&c);
            let total: usize = env.iter().map(Vec::len).sum();
            u32_at(&mut c, count, env.len() as u32)?;
            u32_at(&mut c, size, total as u32)?;
            Ok(ESUCCESS)
        },
    )?;
    l.func_wrap(
        M,
        "environ_get",
        |mut c: C<'_>, ptrs: i32, buf: i32| -> Result<i32> {
            let mut at = buf;
            for (i, e) in environ(&c).iter().enumerate() {
                u32_at(&mut c, ptrs + 4 * i as i32, at as u32)?;
                write(&mut c, at, e)?;
                at += e.len() as i32;
            }
            Ok(ESUCCESS)
        },
    )?;
    l.func_wrap(
        M,
        "args_sizes_get",
        |mut c: C<'_>, count: i32, size: i32| -> Result<i32> {
            u32_at(&mut c, count, 0)?;
            u32_at(&mut c, size, 0)?;
            Ok(ESUCCESS)
        },
    )?;
    l.func_wrap(M, "args_get", |_c: C<'_>, _: i32, _: i32| -> Result<i32> {
        Ok(ESUCCESS)
    })?;
    l.func_wrap(M, "proc_exit", |c: C<'_>, code: i32| -> Result<()> {
        // Envoy only logs; the guest then reaches `unreachable` and traps.
        c.data()
            .log(LogLevel::Error, format!("wasi proc_exit({code})"));
        Ok(())
    })?;
    l.func_wrap(
        M,
        "clock_time_get",
        |mut c: C<'_>, id: i32, _precision: i64, out: i32| -> Result<i32> {
            let now = c.data().core.lock().now();
            match id {
                // realtime, monotonic: both from the host clock, so tests control them.
                0 | 1 => {
                    write(&mut c, out, &now.to_le_bytes())?;
                    Ok(ESUCCESS)
                }
                _ => Ok(ENOTSUP),
            }
        },
    )?;
    l.func_wrap(
        M,
        "clock_res_get",
        |mut c: C<'_>, id: i32, out: i32| -> Result<i32> {
            match id {
                0 | 1 => {
                    write(&mut c, out, &1u64.to_le_bytes())?;
                    Ok(ESUCCESS)
                }
                _ => Ok(ENOTSUP),
            }
        },
    )?;
    l.func_wrap(
        M,
        "random_get",
        |mut c: C<'_>, buf: i32, len: i32| -> Result<i32> {
            let len = len as u32 as usize;
            if len > MAX_RANDOM {
                return Ok(EINVAL);
            }
            let mut bytes = Vec::with_capacity(len + 8);
            {
                let mut s = c.data().core.lock();
                while bytes.len() < len {
                    bytes.extend_from_slice(&s.random_u64().to_le_bytes());
                }
            }
            bytes.truncate(len);
            write(&mut c, buf, &bytes)?;
            Ok(ESUCCESS)
        },
    )?;
    l.func_wrap(M, "sched_yield", |_c: C<'_>| -> Result<i32> {
        Ok(ESUCCESS)
    })?;
    l.func_wrap(
        M,
        "poll_oneoff",
        |mut c: C<'_>, _in: i32, _out: i32, _n: i32, nevents: i32| -> Result<i32> {
            u32_at(&mut c, nevents, 0)?;
            Ok(ESUCCESS)
        },
    )?;
    // No files: every descriptor but stdout and stderr is unknown.
    l.func_wrap(M, "fd_close", |_c: C<'_>, _fd: i32| -> Result<i32> {
        Ok(EBADF)
    })?;
    l.func_wrap(
        M,
        "fd_fdstat_get",
        |_c: C<'_>, _fd: i32, _buf: i32| -> Result<i32> { Ok(EBADF) },
    )?;
    l.func_wrap(
        M,
        "fd_prestat_get",
        |_c: C<'_>, _fd: i32, _buf: i32| -> Result<i32> { Ok(EBADF) },
    )?;
    l.func_wrap(
        M,
        "fd_prestat_dir_name",
        |_c: C<'_>, _fd: i32, _p: i32, _n: i32| -> Result<i32> { Ok(EBADF) },
    )?;
    l.func_wrap(
        M,
        "fd_read",
        |_c: C<'_>, _fd: i32, _iovs: i32, _n: i32, _out: i32| -> Result<i32> { Ok(EBADF) },
    )?;
    l.func_wrap(
        M,
        "fd_seek",
        |_c: C<'_>, _fd: i32, _off: i64, _whence: i32, _out: i32| -> Result<i32> { Ok(EBADF) },
    )?;
    Ok(())
}
