//! Building the restorer's plan: a list of raw syscalls (and a few special
//! ops) plus a data area, laid out exactly as the restorer will map it at
//! [`PLAN_ADDR`] (see [`ckpt_wire::restore`]).

use ckpt_wire::Pod;
use ckpt_wire::restore::{Op, PLAN_ADDR, PLAN_MAGIC, PLAN_VERSION, PlanHeader, flags, op};

/// A pointer into the plan's data area, resolved when the plan is finished.
#[derive(Clone, Copy, Debug)]
pub struct DataRef(usize);

#[derive(Default)]
pub struct PlanBuilder {
    ops: Vec<Op>,
    /// What each op does, for error messages.
    pub descriptions: Vec<String>,
    data: Vec<u8>,
    /// (op index, arg index, data offset)
    fixups: Vec<(usize, usize, usize)>,
    /// (data offset of a pointer field, data offset it points to)
    data_fixups: Vec<(usize, usize)>,
}

/// A syscall argument: a value or a pointer into the data area.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Val(u64),
    Data(DataRef),
}

impl From<u64> for Arg {
    fn from(v: u64) -> Self {
        Arg::Val(v)
    }
}

impl From<DataRef> for Arg {
    fn from(d: DataRef) -> Self {
        Arg::Data(d)
    }
}

impl PlanBuilder {
    /// Appends bytes to the data area (8-byte aligned) and returns a reference.
    pub fn data(&mut self, bytes: &[u8]) -> DataRef {
        while !self.data.len().is_multiple_of(8) {
            self.data.push(0);
        }
        let off = self.data.len();
        self.data.extend_from_slice(bytes);
        DataRef(off)
    }

    pub fn data_pod<T: Pod>(&mut self, v: &T) -> DataRef {
        self.data(v.as_bytes())
    }

    /// Makes the u64 at `field_offset` inside `at` point to `target`.
    pub fn pointer_in_data(&mut self, at: DataRef, field_offset: usize, target: DataRef) {
        self.data_fixups.push((at.0 + field_offset, target.0));
    }

    fn push(&mut self, o: Op, what: String) -> usize {
        self.ops.push(o);
        self.descriptions.push(what);
        self.ops.len() - 1
    }

    /// A syscall; `expect` makes the result checked for equality.
    pub fn syscall(&mut self, nr: i64, args: &[Arg], expect: Option<u64>, allow_fail: bool, what: impl Into<String>) {
        let mut o = Op { kind: op::SYSCALL, nr: nr as u32, a: [0; 10] };
        let idx = self.ops.len();
        for (i, a) in args.iter().enumerate().take(6) {
            match a {
                Arg::Val(v) => o.a[i] = *v,
                Arg::Data(d) => self.fixups.push((idx, i, d.0)),
            }
        }
        let mut f = 0;
        if allow_fail {
            f |= flags::ALLOW_FAIL;
        }
        if let Some(e) = expect {
            f |= flags::CHECK_EQ;
            o.a[7] = e;
        }
        o.a[6] = f;
        self.push(o, what.into());
    }

    /// Like [`Self::syscall`] for a call that returns a new fd, which the
    /// restorer moves to `fd` ([`flags::MOVE_FD`]).
    pub fn syscall_to_fd(&mut self, nr: i64, args: &[u64], fd: i32, allow_fail: bool, what: impl Into<String>) {
        let mut o = Op { kind: op::SYSCALL, nr: nr as u32, a: [0; 10] };
        o.a[..args.len().min(6)].copy_from_slice(&args[..args.len().min(6)]);
        o.a[6] = flags::MOVE_FD | if allow_fail { flags::ALLOW_FAIL } else { 0 };
        o.a[8] = fd as u64;
        self.push(o, what.into());
    }

    pub fn copy(&mut self, dst: u64, src: u64, len: u64, what: impl Into<String>) {
        self.push(Op { kind: op::COPY, nr: 0, a: [dst, src, len, 0, 0, 0, 0, 0, 0, 0] }, what.into());
    }

    pub fn barrier(&mut self, id: u64, what: impl Into<String>) {
        self.push(Op { kind: op::BARRIER, nr: 0, a: [id, 0, 0, 0, 0, 0, 0, 0, 0, 0] }, what.into());
    }

    pub fn thread(&mut self, kind: u32, a: [u64; 10], what: impl Into<String>) {
        self.push(Op { kind, nr: 0, a }, what.into());
    }

    /// Like [`Self::thread`], the thread running the tail begun at `tail`
    /// ([`Self::begin_tail`]) as its last steps.
    pub fn thread_with_tail(&mut self, kind: u32, a: [u64; 10], tail: usize, what: impl Into<String>) {
        self.push(Op { kind, nr: tail as u32, a }, what.into());
    }

    /// Starts a thread's tail ([`op::TAIL`]): the ops pushed until
    /// [`Self::end_tail`] are skipped by the main sequence.
    pub fn begin_tail(&mut self, what: impl Into<String>) -> usize {
        self.push(Op { kind: op::TAIL, nr: 0, a: [0; 10] }, what.into())
    }

    pub fn end_tail(&mut self, tail: usize) {
        self.ops[tail].a[0] = (self.ops.len() - tail - 1) as u64;
    }

    /// [`op::JOIN`].
    pub fn join(&mut self, what: impl Into<String>) {
        self.push(Op { kind: op::JOIN, nr: 0, a: [0; 10] }, what.into());
    }

    /// The finished plan buffer.
    pub fn finish(mut self) -> (Vec<u8>, Vec<String>) {
        let hdr = std::mem::size_of::<PlanHeader>();
        let ops_len = self.ops.len() * std::mem::size_of::<Op>();
        let data_start = PLAN_ADDR + (hdr + ops_len) as u64;
        for (i, a, off) in std::mem::take(&mut self.fixups) {
            self.ops[i].a[a] = data_start + off as u64;
        }
        for (field, target) in std::mem::take(&mut self.data_fixups) {
            self.data[field..field + 8].copy_from_slice(&(data_start + target as u64).to_le_bytes());
        }
        let total = hdr + ops_len + self.data.len();
        let header = PlanHeader { magic: PLAN_MAGIC, version: PLAN_VERSION, nops: self.ops.len() as u32, total_len: total as u64, _reserved: 0 };
        let mut buf = Vec::with_capacity(total);
        buf.extend_from_slice(header.as_bytes());
        for o in &self.ops {
            buf.extend_from_slice(o.as_bytes());
        }
        buf.extend_from_slice(&self.data);
        (buf, self.descriptions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_refs_point_into_the_mapped_buffer() {
        let mut p = PlanBuilder::default();
        let d = p.data(b"hello");
        p.syscall(1, &[Arg::Val(1), d.into(), Arg::Val(5)], None, false, "write");
        let (buf, desc) = p.finish();
        assert_eq!(desc, vec!["write".to_string()]);
        let o = Op::read_from(&buf[32..]).unwrap();
        let off = (o.a[1] - PLAN_ADDR) as usize;
        assert_eq!(&buf[off..off + 5], b"hello");
        assert_eq!(PlanHeader::read_from(&buf).unwrap().total_len as usize, buf.len());
    }
}
