//! A disk that fills up under the node (a real one: a small tmpfs mounted for the test, so `ENOSPC` comes from the
//! kernel, not from an injection). Three places run out of space: appending to the journal, preallocating its next
//! segment, and writing a checkpoint. In each the batch that could not be made durable is refused (never
//! acknowledged), the node exits non-zero with a message naming the cause, what was acknowledged before is
//! intact, and once space is freed a restart recovers and takes new batches.
//!
//! Mounting needs root: `.ci/run` checks that it can mount a tmpfs and then sets `VIGIL_REQUIRE_TMPFS`, which makes
//! these tests mandatory; elsewhere they are skipped with a message.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use vigil_model::{Event, Offset, parse_line};
use vigil_node::wire::Client;
use vigil_store::journal::{self, JournalConfig};
use vigil_store::layout;

/// Journal segments of 1 MiB (the smallest allowed), so that rolls and preallocations come quickly.
const SEGMENT: u64 = 1 << 20;
const BATCH: usize = 400;
const PRODUCER: &str = "disk-full";

/// A tmpfs mounted on a temporary directory for the test's life.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(bytes: u64) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().expect("temp dir");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            assert!(
                std::env::var_os("VIGIL_REQUIRE_TMPFS").is_none(),
                "VIGIL_REQUIRE_TMPFS is set (.ci/run sets it where a tmpfs can be mounted), but mounting one failed"
            );
            eprintln!("cannot mount a tmpfs (needs root): skipped");
            return None;
        }
        Some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// Fills the file system holding `dir` to the last byte with a filler file, then frees `keep` bytes of it.
fn fill(dir: &Path, keep: u64) -> PathBuf {
    let path = dir.join("filler");
    let mut f = File::create(&path).expect("filler");
    let chunk = vec![0xA5u8; 64 << 10];
    let mut len = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => len += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling: {e}"),
        }
    }
    f.set_len(len.saturating_sub(keep)).expect("freeing");
    f.sync_all().expect("filler synced");
    path
}

fn start(data: &Path, extra: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["serve", "--data"])
        .arg(data)
        .args(["--ingest", "127.0.0.1:0", "--http", "127.0.0.1:0", "--shards", "2"])
        .args(["--journal-segment-bytes", &SEGMENT.to_string()])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vigil serve starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("the node prints its address");
    let addr = line.trim().strip_prefix("listening on ").expect("listening line").to_owned();
    (child, addr)
}

/// Waits until the journal's helper has prepared the next segment (its file is whole).
fn wait_prepared(data: &Path) {
    let prepared = layout::journal(data).join("next.prealloc");
    while fs::metadata(&prepared).map_or(true, |m| m.len() != SEGMENT) {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Batch `n` of the stream: `BATCH` deposits to accounts of their own (each ~60 bytes journaled).
fn batch(n: u64) -> Vec<Event> {
    (0..BATCH)
        .map(|i| {
            let line = format!(r#"{{"type":"deposit","account":"acct-{n}-{i}","asset":"USDC","amount":"1.25"}}"#);
            parse_line(&line).expect("valid")
        })
        .collect()
}

/// The producer's side: batches sent in order, the last one acknowledged.
struct Stream {
    client: Client,
    sequence: u64,
    acked: Offset,
}

impl Stream {
    fn new(addr: &str, sequence: u64, acked: Offset) -> Stream {
        Stream { client: Client::connect(addr).expect("connect"), sequence, acked }
    }

    /// Sends the next batch; `false` once the node refuses one (it is not acknowledged).
    fn send(&mut self) -> bool {
        match self.client.send_as(PRODUCER, self.sequence + 1, &batch(self.sequence + 1)) {
            Ok((first, last, duplicate)) => {
                assert!(!duplicate);
                assert_eq!(first.0, self.acked.0 + 1, "acks follow each other");
                assert_eq!(last.0 - first.0 + 1, BATCH as u64, "an ack covers the whole batch");
                self.acked = last;
                self.sequence += 1;
                true
            }
            Err(_) => false,
        }
    }

    /// Sends until the node refuses a batch, at most `max` batches.
    fn send_until_refused(&mut self, max: usize) {
        for _ in 0..max {
            if !self.send() {
                return;
            }
        }
        panic!("{max} batches acknowledged on a full disk");
    }
}

/// Waits for the node to exit; its status code and standard error.
fn exited(child: Child) -> (Option<i32>, String) {
    let output = child.wait_with_output().expect("exit");
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}

/// The journal's last offset, read as recovery would (after a restart cut any torn tail).
fn journal_end(data: &Path) -> Offset {
    journal::read(&layout::journal(data), &JournalConfig::default(), Offset(1), |_, _| Ok(())).expect("journal")
}

/// After space is freed: the node recovers everything acknowledged (and at most the refused batch, whole:
/// journaled, never acknowledged), answers a resend of the refused batch once, and takes new batches.
fn restart_recovers(data: &Path, filler: &Path, stream: &Stream) {
    fs::remove_file(filler).expect("space freed");
    let (node, addr) = start(data, &[]);
    let mut resumed = Stream::new(&addr, stream.sequence, stream.acked);
    // The refused batch, resent with its number: journaled once whether or not it had reached the journal.
    assert!(resumed.client.send_as(PRODUCER, stream.sequence + 1, &batch(stream.sequence + 1)).is_ok());
    resumed.sequence += 1;
    resumed.acked = Offset(stream.acked.0 + BATCH as u64);
    assert!(resumed.send(), "a batch after the restart is acknowledged");
    let _ = Command::new("kill").arg("-TERM").arg(node.id().to_string()).status();
    let (code, stderr) = exited(node);
    assert_eq!(code, Some(0), "the restarted node stops cleanly on SIGTERM: {stderr}");
    assert_eq!(journal_end(data), resumed.acked, "every batch once: nothing lost, nothing twice");
}

/// The journal runs out of space with `keep` bytes left after its first batch: the node refuses a batch within
/// `max`, exits with status 2 naming `cause` and ENOSPC, and recovers once space is freed.
fn journal_runs_out(keep: u64, max: usize, cause: &str) {
    let Some(fs) = Tmpfs::mount(16 * SEGMENT) else { return };
    let data = fs.path().join("data");
    // No checkpoint during the test: only the journal needs space.
    let (node, addr) = start(&data, &["--checkpoint-secs", "3600", "--checkpoint-events", "100000000"]);
    wait_prepared(&data);
    let mut stream = Stream::new(&addr, 0, Offset(0));
    assert!(stream.send(), "acknowledged before the disk fills");
    let filler = fill(fs.path(), keep);
    stream.send_until_refused(max);
    let (code, stderr) = exited(node);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains(cause) && stderr.contains("No space left on device"), "{stderr}");
    restart_recovers(&data, &filler, &stream);
}

#[test]
fn a_full_disk_while_appending_refuses_the_batch_and_exits_non_zero() {
    // The first segment grows as it is written: with 16 KiB left, an append runs out.
    journal_runs_out(16 << 10, 50, "writing the journal");
}

#[test]
fn a_full_disk_when_preallocating_a_segment_refuses_the_batch_and_exits_non_zero() {
    // Room for the first segment to grow to its end (the second is prepared already), not for a third.
    journal_runs_out(SEGMENT + SEGMENT / 2, 200, "preallocating a segment");
}

#[test]
fn a_full_disk_when_checkpointing_stops_the_node_and_loses_nothing() {
    let Some(fs) = Tmpfs::mount(16 * SEGMENT) else { return };
    let data = fs.path().join("data");
    let (node, addr) = start(&data, &["--checkpoint-secs", "3600", "--checkpoint-events", "2000"]);
    let mut stream = Stream::new(&addr, 0, Offset(0));
    // Into the second (preallocated) segment, with the third prepared: appends need no new space from here on.
    let segments = || {
        let entries = fs::read_dir(layout::journal(&data)).into_iter().flatten().flatten();
        entries.filter(|e| e.file_name().to_string_lossy().ends_with(".log")).count()
    };
    while segments() < 2 {
        assert!(stream.send());
    }
    wait_prepared(&data);
    let filler = fill(fs.path(), 0);
    // Appends go on into preallocated space; every checkpoint fails, and after three in a row the node stops.
    stream.send_until_refused(200);
    let (code, stderr) = exited(node);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(stderr.contains("checkpoint store failing"), "{stderr}");
    restart_recovers(&data, &filler, &stream);
}
