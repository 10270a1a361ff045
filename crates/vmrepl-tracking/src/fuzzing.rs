//! Body of the `nbd_reply` fuzz target (the `fuzz/` crate at the repository root) and of the
//! regression test that replays its corpus on stable. Not part of the stable API.

use std::io::Cursor;
use std::path::Path;

use crate::extents::{Chunk, ChunkData};
use crate::nbd::{NbdClient, NbdRangeReader};

/// The meta context id a pre-negotiated client was granted.
const CONTEXT_ID: u32 = 7;

fn client(server: &[u8], size: u64, context: Option<u32>) -> NbdClient {
    NbdClient::over(
        Path::new("fuzz"),
        "disk0",
        Box::new(Cursor::new(server.to_vec())),
        Box::new(std::io::sink()),
        size,
        context,
    )
}

/// Ranges must be non-empty, in order, apart (merged when adjacent) and inside the export.
fn check_ranges(ranges: &[(u64, u64)], size: u64) {
    let mut end = None;
    for &(off, len) in ranges {
        assert!(len > 0, "an empty range in {ranges:?}");
        assert!(
            off.checked_add(len).is_some_and(|e| e <= size),
            "range {off}+{len} outside an export of {size} bytes"
        );
        if let Some(end) = end {
            assert!(off > end, "ranges overlap, touch or go back: {ranges:?}");
        }
        end = Some(off + len);
    }
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([
        b.get(i).copied().unwrap_or(0),
        b.get(i + 1).copied().unwrap_or(0),
    ])
}

/// The `nbd_reply` target. The first byte picks what the server's bytes (the rest) answer:
///
/// * `0 mod 4`: the whole handshake (greeting, option replies for structured replies, the meta
///   context and `NBD_OPT_GO`), then block status;
/// * `1 mod 4`, `2 mod 4`: block status requests of a client already connected to an export whose
///   size comes from the next two bytes (dirty ranges, or data ranges);
/// * `3 mod 4`: pipelined reads of up to three ranges (shape from the next eight bytes), whose
///   replies come in structured chunks: data, holes, errors, in any order.
///
/// Checks, besides "no panic" and bounded memory (at most `len / 512 + 2` pieces per read):
/// ranges are non-empty, ordered, merged and inside the export; the chunks a read yields tile
/// the requested ranges exactly, in order, up to the first error.
pub fn nbd_reply(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => {
            let mut c = client(rest, 0, None);
            // The client writes to a sink, so the option replies it waits for are `rest`.
            if c.handshake(Some("qemu:dirty-bitmap:b")).is_ok() {
                assert!(
                    c.context().is_some(),
                    "a handshake without the context passed"
                );
                let size = c.size();
                if let Ok(r) = c.dirty_ranges() {
                    check_ranges(&r, size);
                }
            }
        }
        m @ (1 | 2) => {
            let size = u64::from(u16_at(rest, 0)) * 512;
            let mut c = client(rest.get(2..).unwrap_or_default(), size, Some(CONTEXT_ID));
            let r = if m == 1 {
                c.dirty_ranges()
            } else {
                c.data_ranges()
            };
            if let Ok(r) = r {
                check_ranges(&r, size);
            }
        }
        _ => reads(rest),
    }
}

fn reads(rest: &[u8]) {
    let shape = rest.get(..8).unwrap_or(rest);
    let window = usize::from(shape.first().copied().unwrap_or(0) % 8) + 1;
    let chunk = 4096usize << (shape.get(1).copied().unwrap_or(0) % 4);
    let mut ranges = Vec::new();
    let mut at = 0u64;
    for i in 0..3 {
        let gap = u64::from(shape.get(2 + 2 * i).copied().unwrap_or(0)) * 512;
        let len = u64::from(shape.get(3 + 2 * i).copied().unwrap_or(0)) * 512;
        if len == 0 {
            continue;
        }
        ranges.push((at + gap, len));
        at += gap + len;
    }
    let server = rest.get(8..).unwrap_or_default();
    let reader = NbdRangeReader::new(client(server, 1 << 30, None), &ranges, chunk, window);
    // Where the next chunk must start: the ranges, tiled in order.
    let mut expect = ranges.iter().copied().filter(|r| r.1 > 0);
    let mut cur = expect.next();
    for got in reader {
        let Ok(Chunk { offset, data }) = got else {
            return;
        };
        let len = match &data {
            ChunkData::Data(d) => d.len() as u64,
            ChunkData::Zero(n) => *n,
        };
        let Some((off, left)) = cur else {
            panic!("a chunk {offset}+{len} after the end of the ranges {ranges:?}");
        };
        assert!(len > 0, "an empty chunk at {offset}");
        assert_eq!(offset, off, "a chunk out of place in {ranges:?}");
        assert!(
            len <= left,
            "a chunk {offset}+{len} past its range in {ranges:?}"
        );
        cur = if len == left {
            expect.next()
        } else {
            Some((off + len, left - len))
        };
    }
    assert_eq!(
        cur, None,
        "the reads ended without error before covering {ranges:?}"
    );
}
