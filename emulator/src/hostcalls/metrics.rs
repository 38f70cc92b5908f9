//! Metrics: ids numbered per type as Envoy numbers them, counters that only
//! go up, gauges, histogram samples.

use super::{ok, read_string, st, write, write_u32, C};
use crate::abi::Status;
use crate::host::{Metric, MetricKind};
use crate::vm::VmState;
use wasmtime::{Linker, Result};

pub(super) fn add_to_linker(l: &mut Linker<VmState>) -> Result<()> {
    l.func_wrap(
        "env",
        "proxy_define_metric",
        |mut c: C<'_>, ty: i32, np: i32, nl: i32, out: i32| -> Result<i32> {
            let name = read_string(&mut c, np, nl)?;
            let kind = match ty {
                0 => MetricKind::Counter,
                1 => MetricKind::Gauge,
                2 => MetricKind::Histogram,
                _ => return st(Status::BadArgument),
            };
            let ty = ty as u32;
            let st_ = c.data_mut();
            // Type in the low 2 bits, one sequence per type, as Envoy: counters
            // 4, 8…, gauges 5, 9…, histograms 6, 10…; defining a name again
            // gives a new id for the same stat.
            st_.next_metric[ty as usize] += 4;
            let id = st_.next_metric[ty as usize];
            st_.metric_by_id.insert(id, (name.clone(), ty));
            st_.core.lock().metrics.entry(name).or_insert(Metric {
                kind,
                value: 0,
                samples: Vec::new(),
            });
            write_u32(&mut c, out, id)?;
            ok()
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_metric",
        |mut c: C<'_>, id: i32, out: i32| -> Result<i32> {
            let Some((name, ty)) = c.data().metric_by_id.get(&(id as u32)).cloned() else {
                return st(Status::NotFound);
            };
            if ty == 2 {
                return st(Status::BadArgument);
            }
            let v = c
                .data()
                .core
                .lock()
                .metrics
                .get(&name)
                .map(|m| m.value)
                .unwrap_or(0);
            write(&mut c, out, &v.to_le_bytes())?;
            ok()
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_record_metric",
        |c: C<'_>, id: i32, v: i64| -> Result<i32> {
            let data = c.data();
            let Some((name, ty)) = data.metric_by_id.get(&(id as u32)) else {
                return st(Status::NotFound);
            };
            let ty = *ty;
            let mut s = data.core.lock();
            let Some(m) = s.metrics.get_mut(name) else {
                return st(Status::NotFound);
            };
            match ty {
                0 => m.value = m.value.wrapping_add(v as u64),
                1 => m.value = v as u64,
                _ => m.samples.push(v as u64),
            }
            ok()
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_increment_metric",
        |c: C<'_>, id: i32, delta: i64| -> Result<i32> {
            let data = c.data();
            let Some((name, ty)) = data.metric_by_id.get(&(id as u32)) else {
                return st(Status::NotFound);
            };
            let ty = *ty;
            let mut s = data.core.lock();
            let Some(m) = s.metrics.get_mut(name) else {
                return st(Status::NotFound);
            };
            match ty {
                0 if delta > 0 => m.value = m.value.wrapping_add(delta as u64),
                1 => m.value = (m.value as i64).wrapping_add(delta) as u64,
                _ => return st(Status::BadArgument),
            }
            ok()
        },
    )?;
    Ok(())
}
