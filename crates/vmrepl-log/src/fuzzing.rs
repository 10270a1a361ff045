//! Bodies of the coverage-guided fuzz targets (the `fuzz/` crate at the repository root) and of
//! the regression tests that replay their corpora on stable. Not part of the stable API.
//!
//! Each function takes arbitrary bytes, must never panic on them, and panics only when an
//! invariant of the codec is broken (which is a bug the fuzzer reports).

use crate::format::{
    u32_at, u64_at, RecordHeader, ENC_ZSTD, KIND_DATA, KIND_ZERO, MIN_HEADER_LEN,
    RECORD_HEADER_LEN, TAG_EXTENT, TAG_TRAILER, TRAILER_LEN,
};
use crate::{
    scan_valid_prefix, verify_reader, Content, LogError, LogHeader, LogReader, LogWriter, Record,
    ResumePoint, Summary,
};

/// The `log_reader` target: `data` is a (possibly cut or corrupt) log. It is checked as it
/// is, and again with all its checksums made right ([`reseal`]): random bytes almost never
/// carry a valid crc32c, and without that the fuzzer could not get past the checksums to the
/// bounds, order and encoding checks behind them.
///
/// Checks, besides "no panic":
/// * the valid prefix is never longer than the input, and scanning the prefix alone finds the
///   same prefix again (cut exactly at a record boundary, so it stops on a truncation);
/// * the streaming reader, [`verify_reader`] and [`LogReader::verified_before`] agree on the
///   records, the valid length and whether the log is whole;
/// * a log the reader accepts whole re-encodes with [`LogWriter`] into a log that verifies with
///   the same header and counts, and that re-encoding cut anywhere and resumed with
///   [`LogWriter::resume`] from its valid prefix gives back exactly the same bytes.
pub fn log_reader(data: &[u8]) {
    check_log(data);
    if let Some(sealed) = reseal(data) {
        if sealed != data {
            check_log(&sealed);
        }
    }
}

/// `data` with the header checksum, every record's checksums (header crc32c, payload crc32c,
/// content BLAKE3) and the trailer (counts, digest, crc32c) recomputed, as far as its framing
/// can be followed; None when not even the header length is usable.
fn reseal(data: &[u8]) -> Option<Vec<u8>> {
    let mut b = data.to_vec();
    let hl = usize::try_from(u32_at(b.get(..16)?, 12)).ok()?;
    if hl < MIN_HEADER_LEN || hl > b.len() {
        return None;
    }
    let crc = crc32c::crc32c(&b[..hl - 4]);
    b[hl - 4..hl].copy_from_slice(&crc.to_le_bytes());
    let mut digest = blake3::Hasher::new();
    digest.update(&b[..hl]);
    let (mut records, mut data_bytes, mut zero_bytes) = (0u64, 0u64, 0u64);
    let mut pos = hl;
    while b.get(pos) == Some(&TAG_EXTENT) && pos + RECORD_HEADER_LEN <= b.len() {
        let h = pos;
        let p = h + RECORD_HEADER_LEN;
        let Some(end) = p
            .checked_add(u32_at(&b, h + 20) as usize)
            .filter(|e| *e <= b.len())
        else {
            break;
        };
        let (kind, disk, offset, len) = (
            b[h + 1],
            u16::from_le_bytes([b[h + 2], b[h + 3]]),
            u64_at(&b, h + 4),
            u32_at(&b, h + 12),
        );
        let crc = crc32c::crc32c(&b[p..end]);
        b[h + 40..h + 44].copy_from_slice(&crc.to_le_bytes());
        let content = match (kind, b[h + 16]) {
            (KIND_DATA, ENC_ZSTD) if len <= crate::MAX_DATA_EXTENT => {
                zstd::bulk::decompress(&b[p..end], len as usize).ok()
            }
            (KIND_DATA, _) => Some(b[p..end].to_vec()),
            _ => Some(Vec::new()),
        };
        if let Some(content) = content {
            let sum = RecordHeader::content_checksum(kind, disk, offset, len, &content);
            b[h + 24..h + 40].copy_from_slice(&sum);
            digest.update(&sum);
        }
        let crc = crc32c::crc32c(&b[h..h + 44]);
        b[h + 44..h + 48].copy_from_slice(&crc.to_le_bytes());
        records += 1;
        match kind {
            KIND_ZERO => zero_bytes += u64::from(len),
            _ => data_bytes += u64::from(len),
        }
        pos = end;
    }
    if b.get(pos) == Some(&TAG_TRAILER) && pos + TRAILER_LEN <= b.len() {
        let t = &mut b[pos..pos + TRAILER_LEN];
        t[8..16].copy_from_slice(&records.to_le_bytes());
        t[16..24].copy_from_slice(&data_bytes.to_le_bytes());
        t[24..32].copy_from_slice(&zero_bytes.to_le_bytes());
        t[32..64].copy_from_slice(digest.finalize().as_bytes());
        let crc = crc32c::crc32c(&t[..64]);
        t[64..68].copy_from_slice(&crc.to_le_bytes());
    }
    Some(b)
}

fn check_log(data: &[u8]) {
    let prefix = scan_valid_prefix(data).expect("a byte slice has no I/O errors");
    assert!(
        prefix.bytes <= data.len() as u64,
        "a valid prefix of {} bytes in {} bytes of input",
        prefix.bytes,
        data.len()
    );
    if prefix.bytes > 0 {
        let again = scan_valid_prefix(&data[..prefix.bytes as usize]).expect("no I/O");
        assert_eq!(
            (again.bytes, again.records, again.complete),
            (prefix.bytes, prefix.records, prefix.complete),
            "the valid prefix of the valid prefix differs"
        );
        if !again.complete {
            assert!(
                matches!(again.stopped_by, Some(LogError::Truncated { .. })),
                "a cut valid prefix did not stop on a truncation: {:?}",
                again.stopped_by
            );
        }
    }

    // The checking reader and the one trusting content checksums, in lockstep.
    let (Ok(mut checked), Ok(mut trusting)) =
        (LogReader::new(data), LogReader::verified_before(data))
    else {
        assert_eq!(
            prefix.bytes, 0,
            "the header was refused but a prefix is valid"
        );
        assert!(verify_reader(data).is_err());
        return;
    };
    let header = checked.header().clone();
    assert_eq!(&header, trusting.header());
    loop {
        let a = checked.next_record().map(|r| r.map(|r| r.to_record()));
        let b = trusting.next_record().map(|r| r.map(|r| r.to_record()));
        match (a, b) {
            (Ok(Some(a)), Ok(Some(b))) => {
                assert_eq!(a, b, "the two readers yield different records");
                assert!(!a.is_empty(), "an empty record was accepted");
            }
            (Ok(None), Ok(None)) => break,
            (Err(_), _) => break,
            (a, b) => panic!("the checking reader gave {a:?} where the trusting one gave {b:?}"),
        }
    }
    assert_eq!(checked.valid_bytes(), prefix.bytes);
    assert_eq!(checked.records(), prefix.records);
    let summary = checked.summary();
    assert_eq!(
        summary.is_some(),
        prefix.complete && prefix.stopped_by.is_none()
    );
    match verify_reader(data) {
        Ok((h, s)) => {
            assert_eq!(Some(s), summary, "verify_reader and the reader disagree");
            assert_eq!(h, header);
            assert_eq!(s.encoded_bytes, data.len() as u64);
        }
        Err(e) => assert!(
            summary.is_none(),
            "verify_reader refused a log the reader took: {e}"
        ),
    }
    if let Some(summary) = summary {
        reencode_and_resume(data, &header, summary);
    }
}

/// Calls `f` with every record of the (whole, valid) log `data`, one at a time.
fn each_record(data: &[u8], mut f: impl FnMut(Record)) {
    let mut r = LogReader::new(data).expect("the header was accepted before");
    while let Some(rec) = r.next_record().expect("the log was accepted before") {
        f(rec.to_record());
    }
}

fn write_records<W: std::io::Write>(w: &mut LogWriter<W>, data: &[u8]) {
    each_record(data, |rec| {
        let res = match &rec.content {
            Content::Data(d) => w.write_data(rec.disk_index, rec.offset, d),
            Content::Zero(n) => w.write_zero(rec.disk_index, rec.offset, u64::from(*n)),
        };
        if let Err(e) = res {
            panic!("the writer refused a record the reader accepted ({rec:?}): {e}");
        }
    });
}

fn reencode_and_resume(data: &[u8], header: &LogHeader, summary: Summary) {
    let mut w = LogWriter::new(Vec::new(), header.clone())
        .unwrap_or_else(|e| panic!("the writer refused a header the reader accepted: {e}"));
    write_records(&mut w, data);
    let (s, out) = w.finish_into_inner().expect("finishing a re-encoded log");
    let same = |s: &Summary| (s.records, s.data_bytes, s.zero_bytes);
    assert_eq!(
        same(&s),
        same(&summary),
        "the re-encoded log counts differently"
    );
    let (h2, s2) = verify_reader(&out[..])
        .unwrap_or_else(|e| panic!("the re-encoded log does not verify: {e}"));
    assert_eq!(&h2, header);
    assert_eq!(s2, s);

    // Cut the re-encoding somewhere (the place depends on the input) and resume it.
    let cut = (data.len() * 7919) % (out.len() + 1);
    let prefix = scan_valid_prefix(&out[..cut]).expect("no I/O");
    if prefix.complete {
        return;
    }
    let held = prefix.bytes as usize;
    assert!(held <= cut);
    let mut w = LogWriter::resume(Vec::new(), header.clone(), ResumePoint::from(prefix))
        .unwrap_or_else(|e| panic!("cannot resume at a valid prefix: {e}"));
    write_records(&mut w, data);
    let (s3, tail) = w.finish_into_inner().expect("finishing a resumed log");
    assert_eq!(s3, s, "a resumed log counts differently");
    let mut resumed = out[..held].to_vec();
    resumed.extend_from_slice(&tail);
    assert!(
        resumed == out,
        "a log resumed at byte {held} differs from the uncut one"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Compression, Consistency, DiskInfo, LogKind};

    fn log(compression: Compression) -> Vec<u8> {
        let header = LogHeader {
            vm_id: uuid::Uuid::nil(),
            sequence: 2,
            base_sequence: 1,
            timestamp_unix_ms: 1,
            kind: LogKind::Delta,
            consistency: Consistency::Crash,
            compression,
            disks: vec![DiskInfo {
                id: "disk0".into(),
                virtual_size: 1 << 20,
            }],
        };
        let mut w = LogWriter::new(Vec::new(), header).unwrap();
        w.write_data(0, 0, &[3u8; 4096]).unwrap();
        w.write_zero(0, 8192, 4096).unwrap();
        w.finish_into_inner().unwrap().1
    }

    #[test]
    fn resealing_keeps_a_valid_log_and_makes_a_changed_one_verify_again() {
        for c in [Compression::None, Compression::Zstd] {
            let good = log(c);
            assert_eq!(reseal(&good).unwrap(), good);
            // Move the zero record (the last before the trailer) to another offset.
            let zero_at = good.len() - TRAILER_LEN - RECORD_HEADER_LEN;
            let mut bad = good.clone();
            bad[zero_at + 4..zero_at + 12].copy_from_slice(&65536u64.to_le_bytes());
            assert!(verify_reader(&bad[..]).is_err());
            let (_, s) = verify_reader(&reseal(&bad).unwrap()[..]).unwrap();
            assert_eq!((s.records, s.data_bytes, s.zero_bytes), (2, 4096, 4096));
        }
    }
}
