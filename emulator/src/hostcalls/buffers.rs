//! Body and configuration buffers: the stream's request and response bodies
//! (read and rewritten as Envoy's `setBuffer` does), a callout's answer, the
//! VM and plugin configurations.

use super::{give, link, ok, read, st, C};
use crate::abi::{buffer, Status};
use crate::stream::Direction;
use crate::vm::VmState;
use wasmtime::{Linker, Result};

pub(super) fn add_to_linker(l: &mut Linker<VmState>) -> Result<()> {
    l.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut c: C<'_>, ty: i32, start: i32, max: i32, pp: i32, pn: i32| -> Result<i32> {
            let data: Option<Vec<u8>> = match ty {
                buffer::REQUEST_BODY | buffer::RESPONSE_BODY => link(&c).and_then(|l| {
                    let dir = if ty == buffer::REQUEST_BODY {
                        Direction::Request
                    } else {
                        Direction::Response
                    };
                    let d = l.stream.lock();
                    d.body(l.filter, dir).cloned()
                }),
                buffer::CALL_RESPONSE_BODY => c.data().call.as_ref().and_then(|x| x.body.clone()),
                buffer::GRPC_RECEIVE => c.data().call.as_ref().and_then(|x| x.grpc_message.clone()),
                buffer::VM_CONFIGURATION => Some(c.data().meta.vm_configuration.clone()),
                buffer::PLUGIN_CONFIGURATION if c.data().in_configure => {
                    Some(c.data().meta.configuration.clone())
                }
                _ => None,
            };
            let Some(data) = data else {
                return st(Status::NotFound);
            };
            let (start, max) = (u64::from(start as u32), u64::from(max as u32));
            if start.checked_add(max).is_none() {
                return st(Status::BadArgument);
            }
            let len = data.len() as u64;
            let slice: &[u8] = if start > len {
                &[]
            } else {
                let end = len.min(start + max);
                &data[start as usize..end as usize]
            };
            give(&mut c, slice, pp, pn)?;
            ok()
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut c: C<'_>, ty: i32, start: i32, size: i32, p: i32, n: i32| -> Result<i32> {
            let bytes = read(&mut c, p, n)?;
            let dir = match ty {
                buffer::REQUEST_BODY => Direction::Request,
                buffer::RESPONSE_BODY => Direction::Response,
                _ => return st(Status::BadArgument),
            };
            let Some(l) = link(&c) else {
                return st(Status::NotFound);
            };
            let mut d = l.stream.lock();
            let Some(body) = d.body_mut(l.filter, dir) else {
                return st(Status::NotFound);
            };
            let (start, size) = (start as u32 as usize, size as u32 as usize);
            if start == 0 {
                // Envoy: drain `size` bytes from the front, then prepend.
                let drop = size.min(body.len());
                body.drain(..drop);
                body.splice(0..0, bytes);
            } else if start >= body.len() {
                body.extend_from_slice(&bytes);
            } else {
                return st(Status::BadArgument);
            }
            ok()
        },
    )?;
    Ok(())
}
