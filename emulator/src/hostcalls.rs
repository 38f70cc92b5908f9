//! The 37 `env` imports of ABI 0.2.1, with Envoy's statuses and rules: the
//! guest-memory helpers every import uses here, and one module per concern,
//! each adding its imports to the linker.

mod buffers;
mod callouts;
mod context;
mod flow;
mod headers;
mod metrics;
mod properties;
mod shared;

use crate::abi::Status;
use crate::vm::{StreamLink, VmState};
use wasmtime::{Caller, Linker, Result};

type C<'a> = Caller<'a, VmState>;

pub(crate) fn read(c: &mut C<'_>, ptr: i32, len: i32) -> Result<Vec<u8>> {
    let mem = c
        .data()
        .memory
        .ok_or_else(|| wasmtime::format_err!("no memory"))?;
    let (ptr, len) = (ptr as u32 as usize, len as u32 as usize);
    let data = mem.data(&*c);
    let end = ptr
        .checked_add(len)
        .ok_or_else(|| wasmtime::format_err!("pointer overflow"))?;
    data.get(ptr..end)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| wasmtime::format_err!("out of bounds read at {ptr}+{len}"))
}

/// A header name, lower-cased as Envoy stores them (one allocation).
fn read_key(c: &mut C<'_>, ptr: i32, len: i32) -> Result<String> {
    let mut b = read(c, ptr, len)?;
    b.make_ascii_lowercase();
    Ok(String::from_utf8(b).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
}

fn read_string(c: &mut C<'_>, ptr: i32, len: i32) -> Result<String> {
    Ok(String::from_utf8_lossy(&read(c, ptr, len)?).into_owned())
}

pub(crate) fn write(c: &mut C<'_>, ptr: i32, bytes: &[u8]) -> Result<()> {
    let mem = c
        .data()
        .memory
        .ok_or_else(|| wasmtime::format_err!("no memory"))?;
    mem.write(&mut *c, ptr as u32 as usize, bytes)
        .map_err(|_| wasmtime::format_err!("out of bounds write at {ptr}"))
}

fn write_u32(c: &mut C<'_>, ptr: i32, v: u32) -> Result<()> {
    write(c, ptr, &v.to_le_bytes())
}

/// Hands `data` to the guest: allocates exactly `len` bytes with the guest's
/// allocator (the SDK adopts the buffer with `Vec::from_raw_parts`) and writes
/// pointer and length; an empty value is `(0, 0)` without allocating, as in Envoy.
fn give(c: &mut C<'_>, data: &[u8], ptr_out: i32, len_out: i32) -> Result<()> {
    if data.is_empty() {
        write_u32(c, ptr_out, 0)?;
        return write_u32(c, len_out, 0);
    }
    let alloc = c
        .data()
        .alloc
        .clone()
        .ok_or_else(|| wasmtime::format_err!("no allocator"))?;
    let p = alloc.call(&mut *c, data.len() as i32)?;
    if p == 0 {
        wasmtime::bail!("the guest allocator returned null for {} bytes", data.len());
    }
    write(c, p, data)?;
    write_u32(c, ptr_out, p as u32)?;
    write_u32(c, len_out, data.len() as u32)
}

fn ok() -> Result<i32> {
    Ok(Status::Ok as i32)
}

fn st(s: Status) -> Result<i32> {
    Ok(s as i32)
}

fn link(c: &C<'_>) -> Option<StreamLink> {
    let d = c.data();
    d.streams
        .iter()
        .find(|(id, _)| *id == d.effective)
        .map(|(_, l)| l.clone())
}

/// Adds every `env` import to `l`.
pub(crate) fn add_to_linker(l: &mut Linker<VmState>) -> Result<()> {
    context::add_to_linker(l)?;
    buffers::add_to_linker(l)?;
    headers::add_to_linker(l)?;
    properties::add_to_linker(l)?;
    shared::add_to_linker(l)?;
    flow::add_to_linker(l)?;
    callouts::add_to_linker(l)?;
    metrics::add_to_linker(l)
}
