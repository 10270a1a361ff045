//! Writes the seed corpus of the `log_reader` fuzz target: a few small valid logs and cuts of
//! them. Usage: `cargo run -p vmrepl-log --example fuzz_seeds -- fuzz/corpus/log_reader`.

use vmrepl_log::*;

fn header(compression: Compression, disks: &[(&str, u64)], kind: LogKind) -> LogHeader {
    LogHeader {
        vm_id: uuid::Uuid::from_u128(0x1234_5678_9abc_def0_1234_5678_9abc_def0),
        sequence: 7,
        base_sequence: if kind == LogKind::Initial { 0 } else { 6 },
        timestamp_unix_ms: 1_700_000_000_000,
        kind,
        consistency: Consistency::Crash,
        compression,
        disks: disks
            .iter()
            .map(|(id, size)| DiskInfo {
                id: (*id).into(),
                virtual_size: *size,
            })
            .collect(),
    }
}

fn main() {
    let dir = std::path::PathBuf::from(
        std::env::args()
            .nth(1)
            .expect("usage: fuzz_seeds OUTPUT_DIRECTORY"),
    );
    std::fs::create_dir_all(&dir).unwrap();
    let save = |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).unwrap();

    // Zstd, one disk: a compressible data extent, a zero extent, an incompressible extent.
    let mut w = LogWriter::new(
        Vec::new(),
        header(Compression::Zstd, &[("disk0", 1 << 20)], LogKind::Initial),
    )
    .unwrap();
    w.write_data(0, 0, &[7u8; 4096]).unwrap();
    w.write_zero(0, 4096, 8192).unwrap();
    let noise: Vec<u8> = (0u32..2048)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    w.write_data(0, 65536, &noise).unwrap();
    let (_, zstd_log) = w.finish_into_inner().unwrap();
    save("zstd-one-disk.log", &zstd_log);
    save("zstd-one-disk-cut.log", &zstd_log[..zstd_log.len() * 2 / 3]);

    // No compression, two disks (a data disk and the NVRAM pseudo-disk), a delta.
    let mut w = LogWriter::new(
        Vec::new(),
        header(
            Compression::None,
            &[("disk0", 1 << 30), ("nvram", 1 << 16)],
            LogKind::Delta,
        ),
    )
    .unwrap();
    w.write_data(0, 512, b"hello, replica").unwrap();
    w.write_zero(0, 1 << 20, 1 << 20).unwrap();
    w.write_data(1, 0, &[0xAA; 600]).unwrap();
    let (_, raw_log) = w.finish_into_inner().unwrap();
    save("raw-two-disks.log", &raw_log);
    save(
        "raw-two-disks-header-only.log",
        &raw_log[..raw_log.len() / 4],
    );
    let mut trailing = raw_log.clone();
    trailing.extend_from_slice(b"junk");
    save("raw-two-disks-trailing-data.log", &trailing);

    // An empty log: header and trailer only.
    let w = LogWriter::new(
        Vec::new(),
        header(Compression::Zstd, &[("d", 4096)], LogKind::Delta),
    )
    .unwrap();
    let (_, empty) = w.finish_into_inner().unwrap();
    save("empty.log", &empty);
}
