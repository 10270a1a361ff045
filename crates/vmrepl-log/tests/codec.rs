//! Behaviour tests of the log codec: round trips, exhaustive corruption and truncation, ordering,
//! bounds, bounded memory, determinism, resume and garbage input.

use std::io::{self, Read, Write};

use vmrepl_log::*;

/// splitmix64: a tiny deterministic PRNG, so every failure reproduces.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

#[derive(Debug, Clone)]
enum Ext {
    Data(u16, u64, Vec<u8>),
    Zero(u16, u64, u64),
}

fn header(compression: Compression) -> LogHeader {
    LogHeader {
        vm_id: uuid::Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef),
        sequence: 7,
        base_sequence: 6,
        timestamp_unix_ms: 1_750_000_000_123,
        kind: LogKind::Delta,
        consistency: Consistency::AppConsistent,
        compression,
        disks: vec![
            DiskInfo {
                id: "disk0".into(),
                virtual_size: 64 << 20,
            },
            DiskInfo {
                id: "disk1".into(),
                virtual_size: 8 << 20,
            },
            DiskInfo {
                id: "nvram".into(),
                virtual_size: 540_672,
            },
        ],
    }
}

/// A small log: compressible data, incompressible data, zeros, on two disks and the NVRAM.
fn small_extents() -> Vec<Ext> {
    let mut rng = Rng(42);
    vec![
        Ext::Data(0, 0, b"hello vmrepl ".repeat(20)),
        Ext::Zero(0, 4096, 65536),
        Ext::Data(0, 1 << 20, rng.bytes(40)),
        Ext::Data(1, 512, vec![0xab; 100]),
        Ext::Zero(2, 0, 4096),
    ]
}

/// A larger log: split extents (> 1 MiB), many records.
fn big_extents() -> Vec<Ext> {
    let mut rng = Rng(7);
    let mut v = vec![
        Ext::Data(0, 0, rng.bytes((2 << 20) + 12345)),
        Ext::Zero(0, 3 << 20, 5 << 20),
    ];
    for i in 0..20u64 {
        let len = 1 + rng.below(70_000) as usize;
        let mut d = rng.bytes(len);
        if i % 2 == 0 {
            d.iter_mut().step_by(3).for_each(|b| *b = 0); // partly compressible
        }
        v.push(Ext::Data(1, i * 131_072, d));
    }
    v.push(Ext::Data(2, 0, vec![0x55; 540_672]));
    v
}

fn encode_into<W: Write>(w: LogWriter<W>, exts: &[Ext]) -> (Summary, W) {
    let mut w = w;
    for e in exts {
        match e {
            Ext::Data(d, o, data) => w.write_data(*d, *o, data).unwrap(),
            Ext::Zero(d, o, n) => w.write_zero(*d, *o, *n).unwrap(),
        }
    }
    w.finish_into_inner().unwrap()
}

fn encode(c: Compression, exts: &[Ext]) -> (Vec<u8>, Summary) {
    let (s, v) = encode_into(LogWriter::new(Vec::new(), header(c)).unwrap(), exts);
    assert_eq!(s.encoded_bytes, v.len() as u64);
    (v, s)
}

fn decode(bytes: &[u8]) -> Result<Vec<Record>, LogError> {
    LogReader::new(bytes)?.collect()
}

/// The records the writer must produce: extents split at 1 MiB (data) / 1 GiB (zero).
fn expected_records(exts: &[Ext]) -> Vec<Record> {
    let mut out = Vec::new();
    for e in exts {
        match e {
            Ext::Data(d, o, data) => {
                for (i, c) in data.chunks(MAX_DATA_EXTENT as usize).enumerate() {
                    out.push(Record {
                        disk_index: *d,
                        offset: o + (i as u64) * u64::from(MAX_DATA_EXTENT),
                        content: Content::Data(c.to_vec()),
                    });
                }
            }
            Ext::Zero(d, o, n) => {
                let mut done = 0;
                while done < *n {
                    let k = (n - done).min(u64::from(MAX_ZERO_EXTENT));
                    out.push(Record {
                        disk_index: *d,
                        offset: o + done,
                        content: Content::Zero(k as u32),
                    });
                    done += k;
                }
            }
        }
    }
    out
}

/// Byte offsets where the header and each record end, from a clean read.
fn boundaries(bytes: &[u8]) -> Vec<u64> {
    let mut r = LogReader::new(bytes).unwrap();
    let mut b = vec![r.valid_bytes()];
    while r.next_record().unwrap().is_some() {
        b.push(r.valid_bytes());
    }
    b
}

/// Re-seals the header checksum after a test edited header fields.
fn reseal_header(bytes: &mut [u8]) {
    let hl = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let crc = crc32c::crc32c(&bytes[..hl - 4]);
    bytes[hl - 4..hl].copy_from_slice(&crc.to_le_bytes());
}

fn header_len(bytes: &[u8]) -> usize {
    u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize
}

#[test]
fn round_trip_two_disks_compressed_and_not() {
    for exts in [small_extents(), big_extents()] {
        let want = expected_records(&exts);
        let mut sizes = Vec::new();
        for c in [Compression::None, Compression::Zstd] {
            let (bytes, s) = encode(c, &exts);
            let mut r = LogReader::new(&bytes[..]).unwrap();
            assert_eq!(r.header(), &header(c));
            let got: Vec<Record> = r.by_ref().collect::<Result<_, _>>().unwrap();
            assert_eq!(got, want);
            assert_eq!(r.summary(), Some(s));
            assert_eq!(s.records, want.len() as u64);
            let data: u64 = want
                .iter()
                .filter(|r| matches!(r.content, Content::Data(_)))
                .map(|r| u64::from(r.len()))
                .sum();
            let zero: u64 = want
                .iter()
                .filter(|r| matches!(r.content, Content::Zero(_)))
                .map(|r| u64::from(r.len()))
                .sum();
            assert_eq!((s.data_bytes, s.zero_bytes), (data, zero));
            let (h, vs) = verify_reader(&bytes[..]).unwrap();
            assert_eq!((h, vs), (header(c), s));
            sizes.push(bytes.len());
        }
        assert!(sizes[1] < sizes[0], "zstd must shrink this log: {sizes:?}");
    }
}

#[test]
fn verify_file_and_missing_file() {
    let (bytes, s) = encode(Compression::Zstd, &small_extents());
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("7.vmrlog");
    std::fs::write(&p, &bytes).unwrap();
    assert_eq!(verify(&p).unwrap().1, s);
    let e = verify(&dir.path().join("nope")).unwrap_err();
    assert!(matches!(e, LogError::Open { .. }), "{e}");
}

#[test]
fn incompressible_data_is_stored_raw() {
    let mut rng = Rng(1);
    let data = rng.bytes(100_000);
    let (bytes, _) = encode(Compression::Zstd, &[Ext::Data(0, 0, data.clone())]);
    let hl = header_len(&bytes);
    assert_eq!(bytes.len(), hl + 48 + data.len() + 68);
    assert_eq!(&bytes[hl + 48..hl + 48 + data.len()], &data[..]);
}

#[test]
fn a_block_with_one_compressible_quarter_is_still_compressed() {
    // 64 KiB: random data with zeros from the middle on (new data written into part of a
    // cluster): the sample sees the zeros, so zstd runs and wins.
    let mut data = Rng(2).bytes(65536);
    data[32768..].fill(0);
    let (bytes, _) = encode(Compression::Zstd, &[Ext::Data(0, 0, data.clone())]);
    assert!(bytes.len() < 40_000, "{} bytes", bytes.len());
    assert_eq!(decode(&bytes).unwrap()[0].content, Content::Data(data));
    // Random everywhere: stored raw, byte for byte.
    let data = Rng(3).bytes(65536);
    let (bytes, _) = encode(Compression::Zstd, &[Ext::Data(0, 0, data.clone())]);
    let hl = header_len(&bytes);
    assert_eq!(&bytes[hl + 48..hl + 48 + data.len()], &data[..]);
}

#[test]
fn large_extents_are_split() {
    let exts = [Ext::Data(0, 4096, vec![1u8; (5 << 20) / 2])];
    let (bytes, s) = encode(Compression::None, &exts);
    let got = decode(&bytes).unwrap();
    let lens: Vec<u32> = got.iter().map(Record::len).collect();
    assert_eq!(lens, [1 << 20, 1 << 20, 1 << 19]);
    assert_eq!(got[1].offset, 4096 + (1 << 20));
    assert_eq!(s.records, 3);
}

#[test]
fn encoding_is_deterministic() {
    for c in [Compression::None, Compression::Zstd] {
        let a = encode(c, &big_extents());
        let b = encode(c, &big_extents());
        assert_eq!(a.0, b.0);
        assert_eq!(a.1, b.1);
    }
}

#[test]
fn every_single_bit_flip_is_detected() {
    for c in [Compression::None, Compression::Zstd] {
        let (bytes, _) = encode(c, &small_extents());
        assert!(bytes.len() < 2000, "keep the exhaustive test small");
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut m = bytes.clone();
                m[i] ^= 1 << bit;
                let res = decode(&m);
                assert!(
                    res.is_err(),
                    "flip of bit {bit} at byte {i} went unnoticed ({c:?})"
                );
                assert!(verify_reader(&m[..]).is_err());
                let vp = scan_valid_prefix(&m[..]).unwrap();
                assert!(!vp.complete, "flip at {i}.{bit}: scan says complete");
                assert!(
                    vp.bytes <= i as u64,
                    "flip at {i}: prefix {} covers it",
                    vp.bytes
                );
            }
        }
    }
}

#[test]
fn truncation_at_every_length_is_reported_and_scan_finds_the_prefix() {
    for c in [Compression::None, Compression::Zstd] {
        let exts = small_extents();
        let (bytes, _) = encode(c, &exts);
        let want = expected_records(&exts);
        let bounds = boundaries(&bytes);
        for cut in 0..bytes.len() {
            let part = &bytes[..cut];
            let e = decode(part).unwrap_err();
            assert!(e.is_truncation(), "cut at {cut}: {e}");
            if let LogError::Truncated { at_byte, .. } = e {
                assert_eq!(at_byte, cut as u64);
            }
            let vp = scan_valid_prefix(part).unwrap();
            assert!(!vp.complete);
            assert!(vp.stopped_by.as_ref().unwrap().is_truncation());
            // The longest whole-record boundary at or before the cut.
            let (k, b) = match bounds.iter().rposition(|&b| b <= cut as u64) {
                Some(k) => (k as u64, bounds[k]),
                None => (0, 0),
            };
            assert_eq!((vp.records, vp.bytes), (k, b), "cut at {cut}");
            if vp.bytes > 0 {
                // The prefix decodes to exactly the first K records, then says "truncated".
                let mut r = LogReader::new(&bytes[..vp.bytes as usize]).unwrap();
                let mut got = Vec::new();
                let err = loop {
                    match r.next() {
                        Some(Ok(rec)) => got.push(rec),
                        Some(Err(e)) => break e,
                        None => panic!("a prefix decoded as complete"),
                    }
                };
                assert_eq!(got, want[..k as usize]);
                assert!(
                    matches!(err, LogError::Truncated { at_byte, records } if at_byte == vp.bytes && records == k)
                );
            }
        }
        let vp = scan_valid_prefix(&bytes[..]).unwrap();
        assert!(vp.complete && vp.stopped_by.is_none());
        assert_eq!(
            (vp.bytes, vp.records),
            (bytes.len() as u64, want.len() as u64)
        );
    }
}

#[test]
fn trailing_garbage_is_rejected_but_scan_keeps_the_log() {
    let (mut bytes, _) = encode(Compression::Zstd, &small_extents());
    let n = bytes.len() as u64;
    bytes.push(0);
    let e = decode(&bytes).unwrap_err();
    assert!(
        matches!(e, LogError::TrailingData { at_byte } if at_byte == n),
        "{e}"
    );
    let vp = scan_valid_prefix(&bytes[..]).unwrap();
    assert!(vp.complete);
    assert_eq!(vp.bytes, n);
}

/// Splits an encoded log into header, record byte ranges and trailer.
fn split(bytes: &[u8]) -> (Vec<u8>, Vec<Vec<u8>>, Vec<u8>) {
    let b = boundaries(bytes);
    let recs = b
        .windows(2)
        .map(|w| bytes[w[0] as usize..w[1] as usize].to_vec())
        .collect();
    let last = *b.last().unwrap() as usize;
    (
        bytes[..b[0] as usize].to_vec(),
        recs,
        bytes[last..].to_vec(),
    )
}

fn join(h: &[u8], recs: &[Vec<u8>], t: &[u8]) -> Vec<u8> {
    let mut v = h.to_vec();
    recs.iter().for_each(|r| v.extend_from_slice(r));
    v.extend_from_slice(t);
    v
}

#[test]
fn reordered_dropped_duplicated_or_foreign_records_are_detected() {
    let (bytes, _) = encode(Compression::Zstd, &small_extents());
    let (h, recs, t) = split(&bytes);
    assert_eq!(join(&h, &recs, &t), bytes);

    let mut swapped = recs.clone();
    swapped.swap(0, 1);
    let e = decode(&join(&h, &swapped, &t)).unwrap_err();
    assert!(matches!(e, LogError::OutOfOrder { record: 1, .. }), "{e}");

    let mut dup = recs.clone();
    dup.insert(1, recs[0].clone());
    let e = decode(&join(&h, &dup, &t)).unwrap_err();
    assert!(matches!(e, LogError::OutOfOrder { .. }), "{e}");

    let mut dropped = recs.clone();
    dropped.remove(1);
    let e = decode(&join(&h, &dropped, &t)).unwrap_err();
    assert!(
        matches!(
            e,
            LogError::TrailerMismatch {
                what: "record count",
                ..
            }
        ),
        "{e}"
    );

    // Same shape, other data: every record is valid on its own, only the digest can tell.
    let mut other_exts = small_extents();
    other_exts[3] = Ext::Data(1, 512, vec![0xcd; 100]);
    let (other, _) = encode(Compression::Zstd, &other_exts);
    let (_, orecs, _) = split(&other);
    let mut foreign = recs.clone();
    foreign[3] = orecs[3].clone();
    let e = decode(&join(&h, &foreign, &t)).unwrap_err();
    assert!(
        matches!(
            e,
            LogError::TrailerMismatch {
                what: "log digest",
                ..
            }
        ),
        "{e}"
    );
    // A trailer from another log with the same counts is also caught.
    let (_, _, ot) = split(&other);
    assert!(decode(&join(&h, &recs, &ot)).is_err());
}

#[test]
fn extent_beyond_disk_end_is_refused_by_reader_and_writer() {
    // Shrink disk1 in the header after encoding (and re-seal it): the record now overflows.
    let (mut bytes, _) = encode(Compression::None, &[Ext::Data(1, 4096, vec![9; 1000])]);
    let hl = header_len(&bytes);
    let size_at = 64 + (1 + 5 + 8) + (1 + 5); // disk0 entry, then disk1's len + id
    bytes[size_at..size_at + 8].copy_from_slice(&5000u64.to_le_bytes());
    reseal_header(&mut bytes[..hl]);
    let e = decode(&bytes).unwrap_err();
    match &e {
        LogError::ExtentBeyondDisk {
            disk,
            offset,
            len,
            size,
            ..
        } => assert_eq!(
            (disk.as_str(), *offset, *len, *size),
            ("disk1", 4096, 1000, 5000)
        ),
        other => panic!("{other}"),
    }
    let msg = e.to_string();
    for s in ["disk1", "4096", "1000", "5000"] {
        assert!(msg.contains(s), "{msg}");
    }

    let mut w = LogWriter::new(io::sink(), header(Compression::None)).unwrap();
    assert!(matches!(
        w.write_data(2, 540_000, &[0; 1000]),
        Err(LogError::ExtentBeyondDisk { .. })
    ));
    assert!(matches!(
        w.write_zero(0, u64::MAX - 10, 100),
        Err(LogError::ExtentBeyondDisk { .. })
    ));
    assert!(matches!(
        w.write_zero(3, 0, 1),
        Err(LogError::UnknownDisk { disk_index: 3, .. })
    ));
    // Refused calls leave the writer usable.
    w.write_data(0, 0, &[1; 10]).unwrap();
    assert!(matches!(
        w.write_data(0, 5, &[1; 10]),
        Err(LogError::OutOfOrder { .. })
    ));
    w.write_data(0, 10, &[1; 10]).unwrap(); // adjacent is fine
    w.write_zero(1, 0, 10).unwrap();
    assert!(matches!(
        w.write_zero(0, 100, 10),
        Err(LogError::OutOfOrder { .. })
    ));
    assert_eq!(w.finish().unwrap().records, 3);
}

#[test]
fn header_problems_are_named() {
    let (bytes, _) = encode(Compression::Zstd, &small_extents());
    let hl = header_len(&bytes);

    let e = decode(b"PK\x03\x04 definitely a zip file").unwrap_err();
    assert!(matches!(e, LogError::BadMagic { .. }) && e.to_string().contains("not a vmrepl log"));

    let mut v = bytes.clone();
    v[8..10].copy_from_slice(&2u16.to_le_bytes());
    reseal_header(&mut v[..hl]);
    let e = decode(&v).unwrap_err();
    assert!(
        matches!(
            e,
            LogError::UnsupportedVersion {
                found: 2,
                supported: 1
            }
        ),
        "{e}"
    );

    // A future version with a header larger than v1 allows is still "unsupported version".
    let mut v = bytes.clone();
    v[8..10].copy_from_slice(&9u16.to_le_bytes());
    v[12..16].copy_from_slice(&(1u32 << 20).to_le_bytes());
    assert!(matches!(
        decode(&v).unwrap_err(),
        LogError::UnsupportedVersion { found: 9, .. }
    ));

    let mut v = bytes.clone();
    v[10..12].copy_from_slice(&0x0100u16.to_le_bytes());
    reseal_header(&mut v[..hl]);
    assert!(matches!(
        decode(&v).unwrap_err(),
        LogError::UnsupportedFlags {
            unknown: 0x0100,
            ..
        }
    ));

    let mut v = bytes.clone();
    v[40] ^= 1; // base sequence, not re-sealed
    assert!(matches!(
        decode(&v).unwrap_err(),
        LogError::HeaderChecksum { .. }
    ));

    let mut h = header(Compression::None);
    h.disks[1].id = "../etc".into();
    assert!(matches!(
        LogWriter::new(io::sink(), h).unwrap_err(),
        LogError::InvalidHeader { .. }
    ));
    for (id, ok) in [
        ("disk0", true),
        ("efi.vars_1-a", true),
        ("", false),
        (".hidden", false),
        ("a..b", false),
        ("a/b", false),
        ("x".repeat(33).as_str(), false),
        ("é", false),
    ] {
        assert_eq!(validate_disk_id(id).is_ok(), ok, "{id:?}");
    }
    let mut h = header(Compression::None);
    h.disks[2].id = "disk0".into();
    assert!(h.validate().is_err());
    let mut h = header(Compression::None);
    h.base_sequence = 7;
    assert!(h.validate().is_err());
    let mut h = header(Compression::None);
    h.kind = LogKind::Initial;
    assert!(h.validate().is_err());
    h.base_sequence = 0;
    h.validate().unwrap();
}

#[test]
fn oversized_extents_and_bad_encodings_are_refused() {
    let (bytes, _) = encode(Compression::None, &[Ext::Zero(0, 0, 1000)]);
    let hl = header_len(&bytes);
    // Turn the zero record into an oversized data record and re-seal its header crc.
    let mut v = bytes.clone();
    v[hl + 1] = b'D';
    v[hl + 12..hl + 16].copy_from_slice(&((1u32 << 20) + 1).to_le_bytes());
    let crc = crc32c::crc32c(&v[hl..hl + 44]);
    v[hl + 44..hl + 48].copy_from_slice(&crc.to_le_bytes());
    let e = decode(&v).unwrap_err();
    assert!(
        matches!(e, LogError::OversizedExtent { kind: "data", max, .. } if max == MAX_DATA_EXTENT),
        "{e}"
    );
    // A zero record that claims a payload.
    let mut v = bytes.clone();
    v[hl + 20..hl + 24].copy_from_slice(&5u32.to_le_bytes());
    let crc = crc32c::crc32c(&v[hl..hl + 44]);
    v[hl + 44..hl + 48].copy_from_slice(&crc.to_le_bytes());
    assert!(matches!(
        decode(&v).unwrap_err(),
        LogError::MalformedRecord { .. }
    ));
}

#[test]
fn wrong_content_checksum_is_an_extent_checksum_error() {
    let (bytes, _) = encode(Compression::None, &[Ext::Data(1, 512, vec![3; 64])]);
    let hl = header_len(&bytes);
    let mut v = bytes.clone();
    v[hl + 48] ^= 0xff; // payload byte, then re-seal the payload crc so only blake3 can tell
    let pcrc = crc32c::crc32c(&v[hl + 48..hl + 48 + 64]);
    v[hl + 40..hl + 44].copy_from_slice(&pcrc.to_le_bytes());
    let crc = crc32c::crc32c(&v[hl..hl + 44]);
    v[hl + 44..hl + 48].copy_from_slice(&crc.to_le_bytes());
    let e = decode(&v).unwrap_err();
    assert!(
        matches!(&e, LogError::ExtentChecksum { record: 0, disk, offset: 512, len: 64, .. } if disk == "disk1"),
        "{e}"
    );
}

/// A sink that counts bytes and remembers the largest single write.
#[derive(Default)]
struct CountingSink {
    bytes: u64,
    max_write: usize,
}
impl Write for CountingSink {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.bytes += b.len() as u64;
        self.max_write = self.max_write.max(b.len());
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A reader that counts bytes handed out and the largest single read request.
struct CountingReader<R> {
    inner: R,
    bytes: u64,
    max_request: usize,
}
impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        self.max_request = self.max_request.max(b.len());
        let n = self.inner.read(b)?;
        self.bytes += n as u64;
        Ok(n)
    }
}

#[test]
fn memory_stays_bounded_by_one_extent() {
    let mut h = header(Compression::Zstd);
    h.disks[0].virtual_size = 4 << 30;
    let mut w = LogWriter::new(CountingSink::default(), h.clone()).unwrap();
    let mut rng = Rng(3);
    let chunk = rng.bytes(1 << 20);
    w.write_zero(0, 0, 1 << 30).unwrap(); // 1 GiB of zeros: one record, no payload
    let mut offset = 1u64 << 30;
    for _ in 0..24u64 {
        w.write_data(0, offset, &chunk).unwrap();
        offset += 1 << 20;
    }
    w.write_zero(0, offset, (3 << 30) - (24 << 20)).unwrap();
    let (s, sink) = w.finish_into_inner().unwrap();
    assert_eq!(s.zero_bytes, (1 << 30) + (3 << 30) - (24 << 20));
    assert_eq!(s.data_bytes, 24 << 20);
    assert_eq!(sink.bytes, s.encoded_bytes);
    assert!(
        sink.max_write <= (1 << 20) + 64,
        "a write of {}",
        sink.max_write
    );

    // Reading: requests never exceed one extent, and the first record comes out long before the
    // stream is consumed.
    let (_, bytes) = encode_into(
        LogWriter::new(Vec::new(), header(Compression::None)).unwrap(),
        &[
            Ext::Data(0, 0, rng.bytes(16 << 20)),
            Ext::Zero(0, 32 << 20, 32 << 20),
        ],
    );
    let mut r = LogReader::new(CountingReader {
        inner: &bytes[..],
        bytes: 0,
        max_request: 0,
    })
    .unwrap();
    r.next_record().unwrap().unwrap();
    assert!(r.valid_bytes() < bytes.len() as u64 / 8);
    let s = r.by_ref().count();
    assert_eq!(s, 16);
    assert!(r.summary().is_some());
}

/// A sink whose byte count the test can watch while the writer owns it.
struct SharedSink(std::rc::Rc<std::cell::Cell<u64>>);
impl Write for SharedSink {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.set(self.0.get() + b.len() as u64);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn writer_output_is_streamed_not_buffered() {
    let seen = std::rc::Rc::new(std::cell::Cell::new(0u64));
    let mut w = LogWriter::new(SharedSink(seen.clone()), header(Compression::None)).unwrap();
    let mut rng = Rng(5);
    let chunk = rng.bytes(1 << 20);
    let mut before = seen.get();
    for i in 0..8u64 {
        w.write_data(0, i << 20, &chunk).unwrap();
        // Each record reaches the sink during its own call.
        assert_eq!(seen.get(), before + 48 + (1 << 20));
        before = seen.get();
    }
    let s = w.finish().unwrap();
    assert_eq!(seen.get(), s.encoded_bytes);
}

/// Cut `bytes` at `cut`, scan, resume with a fresh writer replaying `exts`, and check the result.
fn resume_round_trip(c: Compression, exts: &[Ext], bytes: &[u8], cut: usize) {
    let vp = scan_valid_prefix(&bytes[..cut]).unwrap();
    let mut file = bytes[..vp.bytes as usize].to_vec();
    if vp.complete {
        assert_eq!(file, bytes);
        return;
    }
    let w = LogWriter::resume(Vec::new(), header(c), vp.into()).unwrap();
    let (s, rest) = encode_into(w, exts);
    file.extend_from_slice(&rest);
    assert_eq!(file, bytes, "cut at {cut}");
    assert_eq!(s.encoded_bytes, bytes.len() as u64);
    assert_eq!(decode(&file).unwrap(), expected_records(exts));
}

#[test]
fn resume_after_a_cut_reproduces_the_log() {
    for c in [Compression::None, Compression::Zstd] {
        let exts = small_extents();
        let (bytes, _) = encode(c, &exts);
        for cut in 0..=bytes.len() {
            resume_round_trip(c, &exts, &bytes, cut);
        }
        let exts = big_extents();
        let (bytes, _) = encode(c, &exts);
        let mut rng = Rng(11);
        for _ in 0..12 {
            let cut = rng.below(bytes.len() as u64 + 1) as usize;
            resume_round_trip(c, &exts, &bytes, cut);
        }
    }
}

#[test]
fn resume_with_different_input_is_detected() {
    let exts = small_extents();
    let (bytes, _) = encode(Compression::Zstd, &exts);
    let b = boundaries(&bytes);
    let vp = scan_valid_prefix(&bytes[..b[3] as usize + 5]).unwrap();
    assert_eq!(vp.records, 3);
    let mut changed = exts.clone();
    changed[0] = Ext::Data(0, 0, b"HELLO vmrepl ".repeat(20)); // already sent, now different
    let w = LogWriter::resume(Vec::new(), header(Compression::Zstd), vp.into()).unwrap();
    let (_, rest) = encode_into(w, &changed);
    let mut file = bytes[..b[3] as usize].to_vec();
    file.extend_from_slice(&rest);
    assert!(matches!(
        decode(&file).unwrap_err(),
        LogError::TrailerMismatch {
            what: "log digest",
            ..
        }
    ));
    // A resume point that cannot belong to this header is refused up front.
    let bad = ResumePoint {
        records: 2,
        bytes: 10,
    };
    assert!(LogWriter::resume(Vec::new(), header(Compression::Zstd), bad).is_err());
    // Replaying fewer records than the receiver holds is refused at finish.
    let w = LogWriter::resume(
        Vec::new(),
        header(Compression::Zstd),
        ResumePoint {
            records: 9,
            bytes: b[3],
        },
    )
    .unwrap();
    let w = {
        let mut w = w;
        w.write_data(0, 0, &[1; 10]).unwrap();
        w
    };
    assert!(matches!(w.finish(), Err(LogError::InvalidWrite { .. })));
}

#[test]
fn random_garbage_never_panics() {
    let mut rng = Rng(0xdead_beef);
    let (valid, _) = encode(Compression::Zstd, &small_extents());
    let (valid_raw, _) = encode(Compression::None, &small_extents());
    let hl = header_len(&valid);
    for i in 0..3000 {
        let len = rng.below(700) as usize;
        let mut g = rng.bytes(len);
        match i % 3 {
            0 => {}
            1 if g.len() >= 8 => g[..8].copy_from_slice(&MAGIC),
            _ => {
                // A valid header followed by garbage.
                let mut v = valid[..hl].to_vec();
                v.extend_from_slice(&g);
                g = v;
            }
        }
        assert!(decode(&g).is_err());
        let _ = scan_valid_prefix(&g[..]).unwrap();
    }
    for i in 0..3000 {
        let base = if i % 2 == 0 { &valid } else { &valid_raw };
        let mut m = base.clone();
        match rng.below(4) {
            0 => {
                for _ in 0..1 + rng.below(8) {
                    let p = rng.below(m.len() as u64) as usize;
                    m[p] = rng.next() as u8;
                }
            }
            1 => {
                let p = rng.below(m.len() as u64) as usize;
                let n = 1 + rng.below(16) as usize;
                let ins = rng.bytes(n);
                m.splice(p..p, ins);
            }
            2 => {
                let p = rng.below(m.len() as u64) as usize;
                let n = (1 + rng.below(16) as usize).min(m.len() - p);
                m.drain(p..p + n);
            }
            _ => {
                // Overwrite a run with a copy of another part of the log.
                let a = rng.below(m.len() as u64) as usize;
                let b = rng.below(m.len() as u64) as usize;
                let n = (1 + rng.below(64) as usize).min(m.len() - a.max(b));
                let src = m[a..a + n].to_vec();
                m[b..b + n].copy_from_slice(&src);
            }
        }
        let res = decode(&m);
        if m != *base {
            assert!(res.is_err(), "mutation #{i} went unnoticed");
        }
        let vp = scan_valid_prefix(&m[..]).unwrap();
        assert!(vp.bytes <= m.len() as u64);
    }
}

#[test]
fn errors_read_as_sentences_with_values() {
    let (bytes, _) = encode(Compression::None, &small_extents());
    let b = boundaries(&bytes);
    let e = decode(&bytes[..b[2] as usize + 3]).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("byte {}", b[2] + 3)) && msg.contains("after 2 whole record"),
        "{msg}"
    );
    assert!(msg.contains("resumed"), "{msg}");
}

/// Pins the v1 encoding: if this changes, the format changed, and old replicas would refuse (or
/// worse, misread) new logs. Bump the version and update FORMAT.md instead of the constant.
/// Uncompressed only: zstd output may legitimately differ between zstd releases.
#[test]
fn v1_encoding_is_frozen() {
    assert_eq!(&MAGIC, b"VMRLOG\r\n");
    let (bytes, _) = encode(Compression::None, &small_extents());
    assert_eq!(&bytes[..8], b"VMRLOG\r\n");
    assert_eq!(&bytes[bytes.len() - 68..bytes.len() - 60], b"TLOGEND\n");
    let got = blake3::hash(&bytes).to_hex().to_string();
    assert_eq!(
        got,
        "ac542910818cada00e6d9f0a27f1c20ffd3f00763465ee463823bbb3d72c45ee",
        "len {}",
        bytes.len()
    );
}

#[test]
fn a_reader_trusting_verified_content_decodes_the_same_and_still_catches_every_bit_flip() {
    let trusting =
        |b: &[u8]| -> Result<Vec<Record>, LogError> { LogReader::verified_before(b)?.collect() };
    for c in [Compression::None, Compression::Zstd] {
        let (bytes, _) = encode(c, &small_extents());
        assert_eq!(trusting(&bytes).unwrap(), decode(&bytes).unwrap());
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut m = bytes.clone();
                m[i] ^= 1 << bit;
                assert!(
                    trusting(&m).is_err(),
                    "flip of bit {bit} at byte {i} went unnoticed ({c:?})"
                );
            }
        }
    }
}

#[test]
fn every_log_kind_survives_encoding_and_decoding() {
    for kind in [
        LogKind::Initial,
        LogKind::Delta,
        LogKind::Resync,
        LogKind::ResyncPart,
    ] {
        let mut h = header(Compression::None);
        h.kind = kind;
        if kind == LogKind::Initial {
            h.base_sequence = 0;
        }
        let w = LogWriter::new(Vec::new(), h).unwrap();
        let (_, bytes) = w.finish_into_inner().unwrap();
        let r = vmrepl_log::LogReader::new(&bytes[..]).unwrap();
        assert_eq!(r.header().kind, kind);
    }
}

#[test]
fn a_header_is_peeked_only_once_all_of_it_is_there() {
    let (bytes, _) = encode(Compression::None, &small_extents());
    let hlen = header_len(&bytes);
    assert!(peek_header(&bytes[..10]).is_none());
    assert!(peek_header(&bytes[..hlen - 1]).is_none());
    let want = header(Compression::None);
    assert_eq!(peek_header(&bytes[..hlen]).unwrap().unwrap(), want);
    assert_eq!(peek_header(&bytes).unwrap().unwrap(), want);
    assert!(peek_header(b"not a log, and long enough").unwrap().is_err());
}
