//! The stream's flow: continuing or closing a direction, and local replies;
//! each is queued as an `Op` and applied after the callback returns.

use super::{link, ok, read, read_string, st, C};
use crate::abi::{parse_pairs, Status};
use crate::stream::{Direction, Op};
use crate::vm::VmState;
use wasmtime::{Linker, Result};

pub(super) fn add_to_linker(l: &mut Linker<VmState>) -> Result<()> {
    l.func_wrap(
        "env",
        "proxy_continue_stream",
        |mut c: C<'_>, ty: i32| -> Result<i32> { stream_op(&mut c, ty, Op::Continue) },
    )?;
    l.func_wrap(
        "env",
        "proxy_close_stream",
        |mut c: C<'_>, ty: i32| -> Result<i32> { stream_op(&mut c, ty, |_, _| Op::Close) },
    )?;
    l.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut c: C<'_>,
         code: i32,
         dp: i32,
         dl: i32,
         bp: i32,
         bl: i32,
         hp: i32,
         hl: i32,
         grpc: i32|
         -> Result<i32> {
            let details = read_string(&mut c, dp, dl)?.replace(' ', "_");
            let body = read(&mut c, bp, bl)?;
            let headers = parse_pairs(&read(&mut c, hp, hl)?).unwrap_or_default();
            // Without a stream (a root context) Envoy does nothing and says Ok.
            let Some(l) = link(&c) else { return ok() };
            let op = Op::LocalReply {
                filter: l.filter,
                status: code as u32,
                details,
                body,
                headers,
                grpc_status: if grpc < 0 { None } else { Some(grpc as u32) },
            };
            c.data_mut().ops.push((l.stream.id, op));
            ok()
        },
    )?;
    Ok(())
}

fn stream_op(c: &mut C<'_>, ty: i32, op: impl FnOnce(Direction, usize) -> Op) -> Result<i32> {
    let dir = match ty {
        0 => Direction::Request,
        1 => Direction::Response,
        _ => return st(Status::BadArgument),
    };
    let Some(l) = link(c) else {
        return st(Status::BadArgument);
    };
    c.data_mut().ops.push((l.stream.id, op(dir, l.filter)));
    ok()
}
