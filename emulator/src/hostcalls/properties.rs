//! Properties (attributes): read from the stream and the plugin, and the
//! values a filter sets.

use super::{give, link, ok, read, st, C};
use crate::abi::Status;
use crate::vm::VmState;
use wasmtime::{Linker, Result};

pub(super) fn add_to_linker(l: &mut Linker<VmState>) -> Result<()> {
    l.func_wrap(
        "env",
        "proxy_get_property",
        |mut c: C<'_>, p: i32, n: i32, pp: i32, pn: i32| -> Result<i32> {
            let raw = read(&mut c, p, n)?;
            let path: Vec<String> = raw
                .split(|b| *b == 0)
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect();
            match crate::stream::property(c.data(), link(&c).as_ref(), &path) {
                Some(v) => {
                    give(&mut c, &v, pp, pn)?;
                    ok()
                }
                None => st(Status::NotFound),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_property",
        |mut c: C<'_>, p: i32, n: i32, vp: i32, vn: i32| -> Result<i32> {
            let raw = read(&mut c, p, n)?;
            let value = read(&mut c, vp, vn)?;
            let key = String::from_utf8_lossy(&raw).replace('\0', ".");
            match link(&c) {
                Some(l) => {
                    l.stream.lock().properties.insert(key, value);
                    ok()
                }
                None => st(Status::NotFound),
            }
        },
    )?;
    Ok(())
}
