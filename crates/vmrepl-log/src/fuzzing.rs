//! Bodies of the coverage-guided fuzz targets (the `fuzz/` crate at the repository root) and of
//! the regression tests that replay their corpora on stable. Not part of the stable API.
//!
//! Each function takes arbitrary bytes, must never panic on them, and panics only when an
//! invariant of the codec is broken (which is a bug the fuzzer reports).

use crate::{
    scan_valid_prefix, verify_reader, Content, LogError, LogHeader, LogReader, LogWriter, Record,
    ResumePoint, Summary,
};

/// The `log_reader` target: `data` is a (possibly cut or corrupt) log.
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
