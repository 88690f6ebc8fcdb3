//! TensorBoard event files, written directly in the run directory (`train.tensorboard = true`
//! or `gm train --tensorboard`), so `tensorboard --logdir runs` shows every run by its folder name.
//!
//! The format is TensorFlow's record file: each record is its length (u64, little endian), the
//! masked CRC-32C of those 8 bytes, the payload, and the payload's masked CRC-32C; each payload
//! is an `Event` protocol buffer (`tensorflow/core/util/event.proto`, `summary.proto`) with a
//! wall time, a step, and a `Summary` of scalars (`simple_value`) or PNG images. The handful of
//! fields gm writes are encoded here by hand rather than through a protobuf code generator.
//!
//! A resumed run writes a new file that opens with a `SessionLog` START event at the first step
//! it runs: TensorBoard's reader then drops the events the stopped run had logged from that step
//! on, as `metrics.jsonl` does, so every step is shown once.

use anyhow::{Context, Result};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    const fn table() -> [u32; 256] {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    }
    const TABLE: [u32; 256] = table();
    let mut c = !0u32;
    for &b in data {
        c = TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// The record format's masked CRC: rotate right by 15 and add a constant.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One record of a TFRecord file: length, its masked CRC, payload, the payload's masked CRC.
pub fn record(payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(payload.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&masked_crc32c(payload).to_le_bytes());
    out
}

// Protocol-buffer wire encoding of the few field kinds an Event needs.
fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}
fn key(out: &mut Vec<u8>, field: u32, wire: u32) {
    varint(out, ((field << 3) | wire) as u64);
}
fn field_varint(out: &mut Vec<u8>, field: u32, v: u64) {
    key(out, field, 0);
    varint(out, v);
}
fn field_f64(out: &mut Vec<u8>, field: u32, v: f64) {
    key(out, field, 1);
    out.extend_from_slice(&v.to_le_bytes());
}
fn field_f32(out: &mut Vec<u8>, field: u32, v: f32) {
    key(out, field, 5);
    out.extend_from_slice(&v.to_le_bytes());
}
fn field_bytes(out: &mut Vec<u8>, field: u32, v: &[u8]) {
    key(out, field, 2);
    varint(out, v.len() as u64);
    out.extend_from_slice(v);
}

/// What one `Summary.Value` holds.
pub enum Value<'a> {
    Scalar(f32),
    /// A PNG file's bytes, its height, width and channel count (1 grey, 3 RGB, 4 RGBA).
    Png {
        png: &'a [u8],
        height: u32,
        width: u32,
        channels: u32,
    },
}

/// Event fields (event.proto): wall_time = 1, step = 2, file_version = 3, summary = 5,
/// session_log = 7. Summary: repeated Value value = 1. Value: tag = 1, simple_value = 2,
/// image = 4. Image: height = 1, width = 2, colorspace = 3, encoded_image_string = 4.
/// SessionLog: status = 1 (START = 1).
enum Body<'a> {
    FileVersion,
    Summary(&'a [(String, Value<'a>)]),
    Start,
}

fn event(wall_time: f64, step: i64, body: Body) -> Vec<u8> {
    let mut e = Vec::new();
    field_f64(&mut e, 1, wall_time);
    if step != 0 {
        field_varint(&mut e, 2, step as u64);
    }
    match body {
        Body::FileVersion => field_bytes(&mut e, 3, b"brain.Event:2"),
        Body::Start => {
            let mut s = Vec::new();
            field_varint(&mut s, 1, 1);
            field_bytes(&mut e, 7, &s);
        }
        Body::Summary(values) => {
            let mut summary = Vec::new();
            for (tag, v) in values {
                let mut val = Vec::new();
                field_bytes(&mut val, 1, tag.as_bytes());
                match v {
                    Value::Scalar(x) => field_f32(&mut val, 2, *x),
                    Value::Png {
                        png,
                        height,
                        width,
                        channels,
                    } => {
                        let mut img = Vec::new();
                        field_varint(&mut img, 1, *height as u64);
                        field_varint(&mut img, 2, *width as u64);
                        field_varint(&mut img, 3, *channels as u64);
                        field_bytes(&mut img, 4, png);
                        field_bytes(&mut val, 4, &img);
                    }
                }
                field_bytes(&mut summary, 1, &val);
            }
            field_bytes(&mut e, 5, &summary);
        }
    }
    e
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// An open event file; every event is written and flushed at once, so a killed run loses
/// nothing it logged (a torn last record is skipped by TensorBoard's reader).
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

impl EventWriter {
    /// A new event file in `dir`, `events.out.tfevents.SECONDS.HOST.PID.NANOS.gm` (names sort in
    /// the order the files were opened, as the reader expects); `resume_at` = the first step a
    /// resumed run runs, marked by a START event.
    pub fn create(dir: &Path, resume_at: Option<usize>) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| {
                h.trim()
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                    .collect::<String>()
            })
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let (file, path) = (0u32..1000)
            .find_map(|k| {
                let path = dir.join(format!(
                    "events.out.tfevents.{}.{host}.{}.{:09}{k:03}.gm",
                    t.as_secs(),
                    std::process::id(),
                    t.subsec_nanos()
                ));
                File::options()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .ok()
                    .map(|f| (f, path))
            })
            .with_context(|| format!("cannot create an event file in {}", dir.display()))?;
        let mut w = Self { file, path };
        w.write(&event(now(), 0, Body::FileVersion))?;
        if let Some(step) = resume_at {
            w.write(&event(now(), step as i64, Body::Start))?;
        }
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, payload: &[u8]) -> Result<()> {
        self.file
            .write_all(&record(payload))
            .and_then(|_| self.file.flush())
            .with_context(|| format!("cannot write {}", self.path.display()))
    }

    /// One event holding `values` at `step`.
    pub fn summary(&mut self, step: usize, values: &[(String, Value)]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        self.write(&event(now(), step as i64, Body::Summary(values)))
    }

    /// Scalars at `step` (non-finite values are written as they are: TensorBoard shows them).
    pub fn scalars(&mut self, step: usize, values: &[(String, f64)]) -> Result<()> {
        let v: Vec<(String, Value)> = values
            .iter()
            .map(|(k, x)| (k.clone(), Value::Scalar(*x as f32)))
            .collect();
        self.summary(step, &v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_values() {
        // The CRC catalogue's check value for CRC-32C, and RFC 3720's (iSCSI) test vectors.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        let inc: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&inc), 0x46DD_794E);
    }

    #[test]
    fn varints_encode_as_protobuf_does() {
        // protobuf's documentation: 150 → 96 01; 300 → ac 02.
        let mut v = Vec::new();
        varint(&mut v, 150);
        assert_eq!(v, [0x96, 0x01]);
        v.clear();
        varint(&mut v, 300);
        assert_eq!(v, [0xac, 0x02]);
        v.clear();
        field_varint(&mut v, 2, 1);
        assert_eq!(v, [0x10, 0x01]);
    }

    #[test]
    fn records_frame_their_payload() {
        let r = record(b"abc");
        assert_eq!(r.len(), 3 + 16);
        assert_eq!(u64::from_le_bytes(r[..8].try_into().unwrap()), 3);
        assert_eq!(&r[12..15], b"abc");
        assert_eq!(
            u32::from_le_bytes(r[15..].try_into().unwrap()),
            masked_crc32c(b"abc")
        );
    }
}
