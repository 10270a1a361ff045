//! A minimal, blocking NBD client for reading a cycle's point in time straight from QEMU.
//!
//! Only what pull-mode extraction needs (protocol: qemu's `docs/interop/nbd.txt` and the NBD
//! protocol document): fixed-newstyle handshake over a Unix socket, structured replies, one
//! meta context (`qemu:dirty-bitmap:<name>`), `NBD_OPT_GO`, then `NBD_CMD_BLOCK_STATUS` to list
//! the dirty ranges and pipelined `NBD_CMD_READ`s whose replies may come out of order and in
//! several chunks (data or hole). Read-only; the connection is closed with `NBD_CMD_DISC`.
//!
//! Blocking I/O on purpose: the log builder runs on a blocking thread and consumes the data
//! in order, so a plain socket with a bounded window of requests in flight is all it needs.

use crate::extents::{Chunk, ChunkData};
use std::collections::{BTreeMap, VecDeque};
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const INFO_EXPORT: u16 = 0;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
const CMD_READ: u16 = 0;
const CMD_DISC: u16 = 2;
const CMD_BLOCK_STATUS: u16 = 7;
const REPLY_FLAG_DONE: u16 = 1;
const REPLY_TYPE_NONE: u16 = 0;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
/// `NBD_STATE_DIRTY` of the `qemu:dirty-bitmap:` context.
const STATE_DIRTY: u32 = 1;
/// `NBD_STATE_ZERO` of the `base:allocation` context (the range reads as zeroes).
const STATE_ZERO: u32 = 2;
/// The largest block-status request: 4 GiB minus 64 KiB (lengths are 32 bits).
const MAX_STATUS_LEN: u64 = 0xFFFF_0000;

/// What went wrong talking to an NBD export; `detail` names the step and the values.
#[derive(Debug, thiserror::Error)]
#[error("NBD export {export:?} at {socket}: {detail}")]
pub struct NbdError {
    pub socket: PathBuf,
    pub export: String,
    pub detail: String,
}

/// The most reply chunks one read request of `len` bytes may be answered with: a server
/// splits a reply into data and hole pieces, but not into pieces smaller than a sector, so more
/// than this means a broken server, whose chunks must not pile up in memory without limit.
pub(crate) fn max_pieces(len: u32) -> usize {
    len as usize / 512 + 2
}

/// Where a client reads replies from and writes requests to: both ends of the Unix socket (or,
/// for the fuzz target, memory).
type Input = Box<dyn Read + Send>;
type Output = Box<dyn Write + Send>;

/// One open, negotiated connection to one export.
pub struct NbdClient {
    socket: PathBuf,
    export: String,
    rd: BufReader<Input>,
    wr: BufWriter<Output>,
    size: u64,
    /// The id the server gave the meta context asked for, if one was.
    context: Option<u32>,
    next_cookie: u64,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("socket", &self.socket)
            .field("export", &self.export)
            .field("size", &self.size)
            .finish()
    }
}

/// One reply chunk's content for a read.
enum Piece {
    Data(u64, Vec<u8>),
    Hole(u64, u64),
}

impl NbdClient {
    /// Connects to `export` on the Unix socket `socket` and negotiates structured replies and,
    /// if given, the meta context `context` (e.g. `qemu:dirty-bitmap:NAME`), which the server
    /// must grant. `timeout` bounds every single read and write on the socket.
    pub fn connect(
        socket: &Path,
        export: &str,
        context: Option<&str>,
        timeout: Duration,
    ) -> Result<NbdClient, NbdError> {
        let fail = |detail: String| NbdError {
            socket: socket.to_path_buf(),
            export: export.to_string(),
            detail,
        };
        let s = UnixStream::connect(socket).map_err(|e| fail(format!("cannot connect: {e}")))?;
        s.set_read_timeout(Some(timeout))
            .and_then(|()| s.set_write_timeout(Some(timeout)))
            .map_err(|e| fail(format!("cannot set socket timeouts: {e}")))?;
        let w = s
            .try_clone()
            .map_err(|e| fail(format!("cannot clone the socket: {e}")))?;
        let mut c = NbdClient::over(socket, export, Box::new(s), Box::new(w), 0, None);
        c.handshake(context)?;
        Ok(c)
    }

    /// A client on any pair of streams, as if negotiated with an export of `size` bytes and
    /// meta context id `context` (the fuzz target starts here or runs [`NbdClient::handshake`]).
    pub(crate) fn over(
        socket: &Path,
        export: &str,
        rd: Input,
        wr: Output,
        size: u64,
        context: Option<u32>,
    ) -> NbdClient {
        NbdClient {
            socket: socket.to_path_buf(),
            export: export.to_string(),
            rd: BufReader::with_capacity(256 << 10, rd),
            wr: BufWriter::new(wr),
            size,
            context,
            next_cookie: 1,
        }
    }

    /// The meta context id the server granted, if one was negotiated.
    pub(crate) fn context(&self) -> Option<u32> {
        self.context
    }

    fn err(&self, detail: impl Into<String>) -> NbdError {
        NbdError {
            socket: self.socket.clone(),
            export: self.export.clone(),
            detail: detail.into(),
        }
    }

    fn io(&self, step: &str) -> impl Fn(std::io::Error) -> NbdError + '_ {
        let step = step.to_string();
        move |e| self.err(format!("{step}: {e}"))
    }

    fn read_exact(&mut self, buf: &mut [u8], step: &str) -> Result<(), NbdError> {
        let r = self.rd.read_exact(buf);
        r.map_err(|e| self.err(format!("{step}: {e}")))
    }

    fn u16(&mut self, step: &str) -> Result<u16, NbdError> {
        let mut b = [0u8; 2];
        self.read_exact(&mut b, step)?;
        Ok(u16::from_be_bytes(b))
    }

    fn u32(&mut self, step: &str) -> Result<u32, NbdError> {
        let mut b = [0u8; 4];
        self.read_exact(&mut b, step)?;
        Ok(u32::from_be_bytes(b))
    }

    fn u64(&mut self, step: &str) -> Result<u64, NbdError> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b, step)?;
        Ok(u64::from_be_bytes(b))
    }

    /// Reads `n` bytes into a new buffer (without zeroing it first: data replies are large).
    fn bytes(&mut self, n: usize, step: &str) -> Result<Vec<u8>, NbdError> {
        let mut v = Vec::with_capacity(n);
        let r = (&mut self.rd).take(n as u64).read_to_end(&mut v);
        match r {
            Ok(k) if k == n => Ok(v),
            Ok(k) => Err(self.err(format!(
                "{step}: the connection closed after {k} of {n} bytes"
            ))),
            Err(e) => Err(self.err(format!("{step}: {e}"))),
        }
    }

    fn send_option(&mut self, opt: u32, data: &[u8]) -> Result<(), NbdError> {
        let mut m = Vec::with_capacity(16 + data.len());
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        let r = self.wr.write_all(&m).and_then(|()| self.wr.flush());
        r.map_err(self.io("send an option"))
    }

    /// Reads one option reply: (type, data). Error replies (bit 31) become errors.
    fn option_reply(&mut self, opt: u32) -> Result<(u32, Vec<u8>), NbdError> {
        let magic = self.u64("read an option reply")?;
        if magic != OPT_REPLY_MAGIC {
            return Err(self.err(format!("bad option reply magic {magic:#x}")));
        }
        let got = self.u32("read an option reply")?;
        let kind = self.u32("read an option reply")?;
        let len = self.u32("read an option reply")? as usize;
        if len > 1 << 20 {
            return Err(self.err(format!("option reply of {len} bytes is too large")));
        }
        let data = self.bytes(len, "read an option reply")?;
        if got != opt {
            return Err(self.err(format!("reply to option {got} where {opt} was asked")));
        }
        if kind & (1 << 31) != 0 {
            return Err(self.err(format!(
                "the server refused option {opt} (error {:#x}: {})",
                kind,
                String::from_utf8_lossy(&data)
            )));
        }
        Ok((kind, data))
    }

    pub(crate) fn handshake(&mut self, context: Option<&str>) -> Result<(), NbdError> {
        if self.u64("read the greeting")? != NBDMAGIC || self.u64("read the greeting")? != IHAVEOPT
        {
            return Err(self.err("the server is not a fixed-newstyle NBD server"));
        }
        let flags = self.u16("read the greeting")?;
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(self.err("the server does not offer fixed newstyle negotiation"));
        }
        let ours = u32::from(FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES));
        let r = self
            .wr
            .write_all(&ours.to_be_bytes())
            .and_then(|()| self.wr.flush());
        r.map_err(self.io("send the client flags"))?;

        self.send_option(OPT_STRUCTURED_REPLY, &[])?;
        let (kind, _) = self.option_reply(OPT_STRUCTURED_REPLY)?;
        if kind != REP_ACK {
            return Err(self.err("the server did not accept structured replies"));
        }
        let name = self.export.clone().into_bytes();
        if let Some(ctx) = context {
            let mut d = Vec::new();
            d.extend_from_slice(&(name.len() as u32).to_be_bytes());
            d.extend_from_slice(&name);
            d.extend_from_slice(&1u32.to_be_bytes());
            d.extend_from_slice(&(ctx.len() as u32).to_be_bytes());
            d.extend_from_slice(ctx.as_bytes());
            self.send_option(OPT_SET_META_CONTEXT, &d)?;
            loop {
                let (kind, data) = self.option_reply(OPT_SET_META_CONTEXT)?;
                match kind {
                    REP_META_CONTEXT if data.len() >= 4 => {
                        let id = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                        if &data[4..] == ctx.as_bytes() {
                            self.context = Some(id);
                        }
                    }
                    REP_ACK => break,
                    k => return Err(self.err(format!("unexpected meta context reply {k}"))),
                }
            }
            if self.context.is_none() {
                return Err(self.err(format!(
                    "the server does not offer meta context {ctx:?} (is the bitmap exported?)"
                )));
            }
        }
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(&name);
        d.extend_from_slice(&0u16.to_be_bytes());
        self.send_option(OPT_GO, &d)?;
        let mut size = None;
        loop {
            let (kind, data) = self.option_reply(OPT_GO)?;
            match kind {
                REP_INFO if data.len() >= 12 && data[..2] == INFO_EXPORT.to_be_bytes() => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&data[2..10]);
                    size = Some(u64::from_be_bytes(b));
                }
                REP_INFO => {}
                REP_ACK => break,
                k => return Err(self.err(format!("unexpected reply {k} to NBD_OPT_GO"))),
            }
        }
        self.size = size.ok_or_else(|| self.err("the server did not say the export's size"))?;
        Ok(())
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn request(&mut self, cmd: u16, offset: u64, len: u32) -> Result<u64, NbdError> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut m = [0u8; 28];
        m[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        m[6..8].copy_from_slice(&cmd.to_be_bytes());
        m[8..16].copy_from_slice(&cookie.to_be_bytes());
        m[16..24].copy_from_slice(&offset.to_be_bytes());
        m[24..28].copy_from_slice(&len.to_be_bytes());
        let r = self.wr.write_all(&m);
        r.map_err(self.io("send a request"))?;
        Ok(cookie)
    }

    fn flush(&mut self) -> Result<(), NbdError> {
        let r = self.wr.flush();
        r.map_err(self.io("send requests"))
    }

    /// Reads one reply chunk: (cookie, done, type, payload). The payload of a data chunk starts
    /// after its offset, which comes separately (so the data is not moved to strip it).
    #[allow(clippy::type_complexity)]
    fn chunk(&mut self) -> Result<(u64, bool, u16, Option<u64>, Vec<u8>), NbdError> {
        let magic = self.u32("read a reply")?;
        match magic {
            STRUCTURED_REPLY_MAGIC => {
                let flags = self.u16("read a reply")?;
                let kind = self.u16("read a reply")?;
                let cookie = self.u64("read a reply")?;
                let mut len = self.u32("read a reply")? as usize;
                if len > (64 << 20) {
                    return Err(self.err(format!("reply chunk of {len} bytes is too large")));
                }
                let mut at = None;
                if kind == REPLY_TYPE_OFFSET_DATA && len >= 8 {
                    at = Some(self.u64("read a reply")?);
                    len -= 8;
                }
                let data = self.bytes(len, "read a reply")?;
                if kind & REPLY_TYPE_ERROR_BIT != 0 {
                    let code = data
                        .get(..4)
                        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                        .unwrap_or(0);
                    let msg = data
                        .get(6..)
                        .map(|m| String::from_utf8_lossy(m).into_owned())
                        .unwrap_or_default();
                    return Err(self.err(format!(
                        "the server failed request {cookie} with error {code} ({msg})"
                    )));
                }
                Ok((cookie, flags & REPLY_FLAG_DONE != 0, kind, at, data))
            }
            SIMPLE_REPLY_MAGIC => {
                let code = self.u32("read a reply")?;
                let cookie = self.u64("read a reply")?;
                if code != 0 {
                    return Err(self.err(format!(
                        "the server failed request {cookie} with error {code}"
                    )));
                }
                Err(self.err(format!(
                    "a simple reply to request {cookie} where structured replies were agreed"
                )))
            }
            m => Err(self.err(format!("bad reply magic {m:#x}"))),
        }
    }

    /// The ranges whose meta-context status has the DIRTY bit (`qemu:dirty-bitmap:` context),
    /// over the whole export, merged and in order.
    pub fn dirty_ranges(&mut self) -> Result<Vec<(u64, u64)>, NbdError> {
        self.ranges_where(|flags| flags & STATE_DIRTY != 0)
    }

    /// The ranges that hold data (`base:allocation` context: neither a hole nor known to read
    /// as zeroes), over the whole export, merged and in order.
    pub fn data_ranges(&mut self) -> Result<Vec<(u64, u64)>, NbdError> {
        self.ranges_where(|flags| flags & STATE_ZERO == 0)
    }

    /// The ranges whose status in the negotiated meta context satisfies `wanted`.
    fn ranges_where(&mut self, wanted: impl Fn(u32) -> bool) -> Result<Vec<(u64, u64)>, NbdError> {
        let ctx = self
            .context
            .ok_or_else(|| self.err("no meta context was negotiated"))?;
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut at = 0u64;
        while at < self.size {
            let len = (self.size - at).min(MAX_STATUS_LEN) as u32;
            let cookie = self.request(CMD_BLOCK_STATUS, at, len)?;
            self.flush()?;
            let mut covered = 0u64;
            let mut described = false;
            loop {
                let (c, done, kind, _, data) = self.chunk()?;
                if c != cookie {
                    return Err(self.err(format!("reply for request {c} where {cookie} was sent")));
                }
                if kind == REPLY_TYPE_BLOCK_STATUS {
                    if data.len() < 4 || (data.len() - 4) % 8 != 0 {
                        return Err(self.err("malformed block status reply"));
                    }
                    let id = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                    // Chunks for other contexts are skipped, but their done flag still counts.
                    if id == ctx {
                        // Each chunk describes the range from `at` again: a second one would
                        // list the same ranges twice.
                        if described {
                            return Err(self.err(format!(
                                "the server described the block status at {at} twice in one \
                                 reply (meta context {ctx})"
                            )));
                        }
                        described = true;
                        let mut pos = at;
                        for d in data[4..].chunks_exact(8) {
                            let n = u64::from(u32::from_be_bytes([d[0], d[1], d[2], d[3]]));
                            let flags = u32::from_be_bytes([d[4], d[5], d[6], d[7]]);
                            let n = n.min(self.size - pos);
                            if n == 0 {
                                break;
                            }
                            if wanted(flags) {
                                match out.last_mut() {
                                    Some(last) if last.0 + last.1 == pos => last.1 += n,
                                    _ => out.push((pos, n)),
                                }
                            }
                            pos += n;
                        }
                        covered = pos - at;
                    }
                } else if kind != REPLY_TYPE_NONE {
                    return Err(self.err(format!("unexpected reply type {kind} to block status")));
                }
                if done {
                    break;
                }
            }
            if covered == 0 {
                return Err(self.err(format!("block status at {at} made no progress")));
            }
            at += covered;
        }
        Ok(out)
    }

    /// Closes the connection politely (`NBD_CMD_DISC`).
    pub fn disconnect(mut self) {
        if self.request(CMD_DISC, 0, 0).is_ok() {
            let _ = self.flush();
        }
    }
}

/// Reads given ranges of an export in order as [`Chunk`]s of at most `chunk` bytes, keeping up
/// to `window` reads in flight. Holes the server reports come out as zero chunks.
pub struct NbdRangeReader {
    client: NbdClient,
    /// Requests not sent yet: (offset, len).
    todo: VecDeque<(u64, u32)>,
    /// Sent, in order: (cookie, offset, len).
    inflight: VecDeque<(u64, u64, u32)>,
    /// Pieces received per cookie, and whether the reply is complete.
    got: BTreeMap<u64, (Vec<Piece>, bool)>,
    ready: VecDeque<Chunk>,
    window: usize,
}

impl NbdRangeReader {
    pub fn new(
        client: NbdClient,
        ranges: &[(u64, u64)],
        chunk: usize,
        window: usize,
    ) -> NbdRangeReader {
        let chunk = chunk.max(4096) as u64;
        let mut todo = VecDeque::new();
        for &(off, len) in ranges {
            let mut at = off;
            while at < off + len {
                let n = (off + len - at).min(chunk);
                todo.push_back((at, n as u32));
                at += n;
            }
        }
        NbdRangeReader {
            client,
            todo,
            inflight: VecDeque::new(),
            got: BTreeMap::new(),
            ready: VecDeque::new(),
            window: window.max(1),
        }
    }

    /// Closes the connection (after the last chunk, or to give up early).
    pub fn finish(self) {
        self.client.disconnect();
    }

    fn step(&mut self) -> Result<(), NbdError> {
        let mut sent = false;
        while self.inflight.len() < self.window {
            let Some((off, len)) = self.todo.pop_front() else {
                break;
            };
            let cookie = self.client.request(CMD_READ, off, len)?;
            self.inflight.push_back((cookie, off, len));
            self.got.insert(cookie, (Vec::new(), false));
            sent = true;
        }
        if sent {
            self.client.flush()?;
        }
        // Read chunks until the oldest request is complete.
        let &(head, off, len) = self
            .inflight
            .front()
            .expect("step is called with work in flight");
        while !self.got.get(&head).is_some_and(|g| g.1) {
            let (cookie, done, kind, at, data) = self.client.chunk()?;
            let Some(&(_, roff, rlen)) = self.inflight.iter().find(|r| r.0 == cookie) else {
                return Err(self
                    .client
                    .err(format!("reply for unknown request {cookie}")));
            };
            let end = roff + u64::from(rlen);
            let piece = match kind {
                REPLY_TYPE_OFFSET_DATA if at.is_some() => {
                    let o = at.unwrap_or_default();
                    Some((o, data.len() as u64, Piece::Data(o, data)))
                }
                REPLY_TYPE_OFFSET_HOLE if data.len() == 12 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&data[..8]);
                    let o = u64::from_be_bytes(b);
                    let n = u64::from(u32::from_be_bytes([data[8], data[9], data[10], data[11]]));
                    Some((o, n, Piece::Hole(o, n)))
                }
                REPLY_TYPE_NONE => None,
                k => {
                    return Err(self
                        .client
                        .err(format!("unexpected reply type {k} to a read")))
                }
            };
            let entry = self.got.get_mut(&cookie).expect("tracked request");
            if let Some((o, n, p)) = piece {
                // The offset comes from the server: `o + n` may not even fit in 64 bits.
                if o < roff || o.checked_add(n).is_none_or(|e| e > end) {
                    return Err(self.client.err(format!(
                        "reply chunk {o}+{n} lies outside request {roff}+{rlen}"
                    )));
                }
                if entry.0.len() >= max_pieces(rlen) {
                    return Err(self.client.err(format!(
                        "the reply to read {roff}+{rlen} comes in more than {} chunks; \
                         the server is broken",
                        max_pieces(rlen)
                    )));
                }
                entry.0.push(p);
            }
            if done {
                entry.1 = true;
            }
        }
        self.inflight.pop_front();
        let (mut pieces, _) = self.got.remove(&head).expect("tracked request");
        pieces.sort_by_key(|p| match p {
            Piece::Data(o, _) | Piece::Hole(o, _) => *o,
        });
        // The pieces must tile the request exactly.
        let mut at = off;
        for p in pieces {
            let (o, c) = match p {
                Piece::Data(o, d) => (
                    o,
                    Chunk {
                        offset: o,
                        data: ChunkData::Data(d),
                    },
                ),
                Piece::Hole(o, n) => (
                    o,
                    Chunk {
                        offset: o,
                        data: ChunkData::Zero(n),
                    },
                ),
            };
            if o != at {
                return Err(self.client.err(format!(
                    "the reply to read {off}+{len} leaves a gap at {at}"
                )));
            }
            at += c.len();
            if !c.is_empty() {
                self.ready.push_back(c);
            }
        }
        if at != off + u64::from(len) {
            return Err(self
                .client
                .err(format!("the reply to read {off}+{len} ends at {at}")));
        }
        Ok(())
    }
}

impl Iterator for NbdRangeReader {
    type Item = Result<Chunk, NbdError>;

    fn next(&mut self) -> Option<Self::Item> {
        while self.ready.is_empty() {
            if self.inflight.is_empty() && self.todo.is_empty() {
                return None;
            }
            if let Err(e) = self.step() {
                self.todo.clear();
                self.inflight.clear();
                return Some(Err(e));
            }
        }
        self.ready.pop_front().map(Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A scripted NBD server: greets, acks structured replies, answers the meta context with
    /// `grant` (or nothing), reports `size` on GO, then runs `serve` on the transmission phase.
    fn server(
        grant: bool,
        size: u64,
        serve: impl FnOnce(&mut UnixStream) + Send + 'static,
    ) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<()>) {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("nbd.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut g = Vec::new();
            g.extend_from_slice(&NBDMAGIC.to_be_bytes());
            g.extend_from_slice(&IHAVEOPT.to_be_bytes());
            g.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
            s.write_all(&g).unwrap();
            let mut flags = [0u8; 4];
            s.read_exact(&mut flags).unwrap();
            let reply = |s: &mut UnixStream, opt: u32, kind: u32, data: &[u8]| {
                let mut m = Vec::new();
                m.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
                m.extend_from_slice(&opt.to_be_bytes());
                m.extend_from_slice(&kind.to_be_bytes());
                m.extend_from_slice(&(data.len() as u32).to_be_bytes());
                m.extend_from_slice(data);
                s.write_all(&m).unwrap();
            };
            loop {
                let mut h = [0u8; 16];
                if s.read_exact(&mut h).is_err() {
                    return;
                }
                let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
                let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
                let mut data = vec![0u8; len as usize];
                s.read_exact(&mut data).unwrap();
                match opt {
                    OPT_STRUCTURED_REPLY => reply(&mut s, opt, REP_ACK, &[]),
                    OPT_SET_META_CONTEXT => {
                        if grant {
                            let mut d = 7u32.to_be_bytes().to_vec();
                            d.extend_from_slice(b"qemu:dirty-bitmap:b");
                            reply(&mut s, opt, REP_META_CONTEXT, &d);
                        }
                        reply(&mut s, opt, REP_ACK, &[]);
                    }
                    OPT_GO => {
                        let mut d = INFO_EXPORT.to_be_bytes().to_vec();
                        d.extend_from_slice(&size.to_be_bytes());
                        d.extend_from_slice(&0u16.to_be_bytes());
                        reply(&mut s, opt, REP_INFO, &d);
                        reply(&mut s, opt, REP_ACK, &[]);
                        break;
                    }
                    _ => reply(&mut s, opt, (1 << 31) | 1, b"unsupported"),
                }
            }
            serve(&mut s);
        });
        (d, sock, t)
    }

    fn request(s: &mut UnixStream) -> (u64, u64, u32) {
        let mut m = [0u8; 28];
        s.read_exact(&mut m).unwrap();
        (
            u64::from_be_bytes(m[8..16].try_into().unwrap()),
            u64::from_be_bytes(m[16..24].try_into().unwrap()),
            u32::from_be_bytes(m[24..28].try_into().unwrap()),
        )
    }

    fn chunk(s: &mut UnixStream, cookie: u64, done: bool, kind: u16, data: &[u8]) {
        let mut m = Vec::new();
        m.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        m.extend_from_slice(&u16::from(done).to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        s.write_all(&m).unwrap();
    }

    const T: Duration = Duration::from_secs(10);

    #[test]
    fn a_server_without_the_bitmap_context_is_refused_by_name() {
        let (_d, sock, t) = server(false, 1 << 20, |_| {});
        let e = NbdClient::connect(&sock, "disk0", Some("qemu:dirty-bitmap:b"), T).unwrap_err();
        assert!(
            e.to_string()
                .contains("does not offer meta context \"qemu:dirty-bitmap:b\""),
            "{e}"
        );
        t.join().unwrap();
    }

    #[test]
    fn out_of_order_chunks_are_put_in_order_and_holes_become_zero_chunks() {
        let (_d, sock, t) = server(true, 1 << 20, |s| {
            // Two reads of 8 KiB arrive; answer the second first, the first in two chunks.
            let (c1, o1, _) = request(s);
            let (c2, o2, _) = request(s);
            let mut d2 = o2.to_be_bytes().to_vec();
            d2.extend_from_slice(&[2u8; 8192]);
            chunk(s, c2, true, REPLY_TYPE_OFFSET_DATA, &d2);
            let mut hole = (o1 + 4096).to_be_bytes().to_vec();
            hole.extend_from_slice(&4096u32.to_be_bytes());
            chunk(s, c1, false, REPLY_TYPE_OFFSET_HOLE, &hole);
            let mut d1 = o1.to_be_bytes().to_vec();
            d1.extend_from_slice(&[1u8; 4096]);
            chunk(s, c1, true, REPLY_TYPE_OFFSET_DATA, &d1);
        });
        let c = NbdClient::connect(&sock, "disk0", Some("qemu:dirty-bitmap:b"), T).unwrap();
        let got: Vec<Chunk> = NbdRangeReader::new(c, &[(0, 16384)], 8192, 4)
            .collect::<Result<_, _>>()
            .unwrap();
        let shape: Vec<(u64, u64, bool)> = got
            .iter()
            .map(|c| (c.offset, c.len(), matches!(c.data, ChunkData::Zero(_))))
            .collect();
        assert_eq!(
            shape,
            vec![(0, 4096, false), (4096, 4096, true), (8192, 8192, false)]
        );
        t.join().unwrap();
    }

    #[test]
    fn a_reply_that_leaves_a_gap_or_reports_an_error_fails_the_read() {
        let (_d, sock, t) = server(true, 1 << 20, |s| {
            let (c, o, _) = request(s);
            let mut d = o.to_be_bytes().to_vec();
            d.extend_from_slice(&[1u8; 4096]);
            chunk(s, c, true, REPLY_TYPE_OFFSET_DATA, &d);
        });
        let c = NbdClient::connect(&sock, "disk0", Some("qemu:dirty-bitmap:b"), T).unwrap();
        let e = NbdRangeReader::new(c, &[(65536, 8192)], 8192, 1)
            .next()
            .unwrap()
            .unwrap_err();
        assert!(e.to_string().contains("ends at 69632"), "{e}");
        t.join().unwrap();

        let (_d, sock, t) = server(true, 1 << 20, |s| {
            let (c, _, _) = request(s);
            let mut d = 5u32.to_be_bytes().to_vec();
            d.extend_from_slice(&2u16.to_be_bytes());
            d.extend_from_slice(b"EIO");
            chunk(s, c, true, REPLY_TYPE_ERROR_BIT | 1, &d);
        });
        let c = NbdClient::connect(&sock, "disk0", Some("qemu:dirty-bitmap:b"), T).unwrap();
        let e = NbdRangeReader::new(c, &[(0, 4096)], 8192, 1)
            .next()
            .unwrap()
            .unwrap_err();
        assert!(e.to_string().contains("with error 5"), "{e}");
        t.join().unwrap();
    }

    #[test]
    fn a_reply_chunk_at_an_offset_near_the_end_of_the_address_space_is_refused_not_overflowed() {
        let (_d, sock, t) = server(true, 1 << 20, |s| {
            let (c, _, _) = request(s);
            let mut d = (u64::MAX - 2).to_be_bytes().to_vec();
            d.extend_from_slice(&[1u8; 16]);
            chunk(s, c, true, REPLY_TYPE_OFFSET_DATA, &d);
        });
        let c = NbdClient::connect(&sock, "disk0", Some("qemu:dirty-bitmap:b"), T).unwrap();
        let e = NbdRangeReader::new(c, &[(0, 4096)], 8192, 1)
            .next()
            .unwrap()
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("reply chunk 18446744073709551613+16 lies outside request 0+4096"),
            "{e}"
        );
        t.join().unwrap();
    }

    #[test]
    fn a_read_answered_in_more_chunks_than_it_has_sectors_is_refused() {
        assert_eq!(max_pieces(4096), 10);
        let (_d, sock, t) = server(true, 1 << 20, |s| {
            let (c, o, _) = request(s);
            // Empty holes never complete the reply; a broken server could send them forever.
            let mut hole = o.to_be_bytes().to_vec();
            hole.extend_from_slice(&0u32.to_be_bytes());
            for _ in 0..=max_pieces(4096) {
                chunk(s, c, false, REPLY_TYPE_OFFSET_HOLE, &hole);
            }
        });
        let c = NbdClient::connect(&sock, "disk0", Some("qemu:dirty-bitmap:b"), T).unwrap();
        let e = NbdRangeReader::new(c, &[(8192, 4096)], 8192, 1)
            .next()
            .unwrap()
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("the reply to read 8192+4096 comes in more than 10 chunks"),
            "{e}"
        );
        t.join().unwrap();
    }

    fn status_chunk(s: &mut UnixStream, cookie: u64, done: bool, ctx: u32, descs: &[(u32, u32)]) {
        let mut d = ctx.to_be_bytes().to_vec();
        for (n, f) in descs {
            d.extend_from_slice(&n.to_be_bytes());
            d.extend_from_slice(&f.to_be_bytes());
        }
        chunk(s, cookie, done, REPLY_TYPE_BLOCK_STATUS, &d);
    }

    #[test]
    fn a_block_status_reply_describing_the_same_range_twice_is_refused() {
        let (_d, sock, t) = server(true, 1 << 20, |s| {
            let (c, _, _) = request(s);
            status_chunk(s, c, false, 7, &[(4096, 0), (8192, 1)]);
            status_chunk(s, c, true, 7, &[(4096, 0), (8192, 1)]);
        });
        let mut c = NbdClient::connect(&sock, "disk0", Some("qemu:dirty-bitmap:b"), T).unwrap();
        let e = c.dirty_ranges().unwrap_err();
        assert!(
            e.to_string()
                .contains("described the block status at 0 twice in one reply (meta context 7)"),
            "{e}"
        );
        t.join().unwrap();
    }

    #[test]
    fn a_block_status_chunk_for_another_context_still_ends_the_reply_when_done() {
        let (_d, sock, t) = server(true, 1 << 20, |s| {
            let (c, _, _) = request(s);
            status_chunk(s, c, false, 7, &[(4096, 0), (1020 * 1024, 1)]);
            status_chunk(s, c, true, 9, &[(1 << 20, 1)]);
        });
        let mut c = NbdClient::connect(&sock, "disk0", Some("qemu:dirty-bitmap:b"), T).unwrap();
        assert_eq!(c.dirty_ranges().unwrap(), vec![(4096, 1020 * 1024)]);
        t.join().unwrap();
    }
}
