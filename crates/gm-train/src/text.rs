//! Text for the `text-ar` language model: the corpus, a byte-level BPE tokenizer trained on it
//! (HuggingFace `tokenizers`), the corpus as token windows for gm's trainer ([`TextData`]),
//! held-out NLL in bits per byte, and generation.
//!
//! The default corpus is Debian's `fortunes` package (BSD licence, ~1 MB of English quotations,
//! `apt-get install fortunes`; files in `/usr/share/games/fortunes`): entries are separated by
//! `%` lines, and every tenth entry is held out for evaluation. Any folder of text files (or one
//! file) works with `--data-dir`; files without `%` separators are split into paragraphs.
//!
//! Bits per byte are exact for this model: byte-level BPE is lossless, so
//! `−log₂ p(text) / bytes(text)` with `p(text) = p(t₁) Π p(t_i | t_<i)` counts every byte; the first
//! token of the held-out stream is charged `log₂ V` (a uniform guess), and the context is reset
//! every `context` tokens (each window sees only its own past), which can only cost, not gain.

use crate::checkpoint::{self, read_safetensors};
use crate::config::RunConfig;
use crate::source::TrainData;
use crate::trainer::set_vars;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use gm_core::GmRng;
use gm_models::text::{TextAr, TextArConfig};
use gm_models::{Batch, EvalOptions, Model};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper, Tokenizer,
    TokenizerBuilder,
};

/// Where Debian's `fortunes` package puts its text.
pub const FORTUNES_DIR: &str = "/usr/share/games/fortunes";

/// Documents of a corpus, split into a training and a held-out part.
#[derive(Clone, Debug)]
pub struct Corpus {
    pub train: Vec<String>,
    pub test: Vec<String>,
    pub source: String,
}

/// Reads a folder of text files (skipping `fortune`'s binary `.dat` indexes and the `.u8`
/// duplicates) or a single file; every tenth document goes to `test`.
pub fn load_corpus(path: &Path) -> Result<Corpus> {
    if !path.exists() {
        bail!(
            "{}: no text corpus there. gm's text presets read Debian's `fortunes` package \
             (BSD licence): `apt-get install fortunes`, or pass --data-dir DIR (text files)",
            path.display()
        );
    }
    let files: Vec<PathBuf> = if path.is_file() {
        vec![path.to_path_buf()]
    } else {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot list {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p.file_name().map(|n| n.to_string_lossy().to_string());
                p.is_file()
                    && !name.is_none_or(|n| {
                        n.starts_with('.') || n.ends_with(".dat") || n.ends_with(".u8")
                    })
            })
            .collect();
        v.sort();
        v
    };
    let mut docs = Vec::new();
    for f in &files {
        let bytes = std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?;
        let text = String::from_utf8(bytes)
            .map_err(|e| {
                anyhow!(
                    "{}: not UTF-8 text (invalid byte at offset {}): the text model trains on text files",
                    f.display(),
                    e.utf8_error().valid_up_to()
                )
            })?
            .replace("\r\n", "\n");
        let parts: Vec<&str> = if text.contains("\n%\n") {
            text.split("\n%\n").collect()
        } else {
            text.split("\n\n").collect()
        };
        docs.extend(
            parts
                .into_iter()
                .map(|p| p.trim_matches(['\n', '%']))
                .filter(|p| !p.trim().is_empty())
                .map(|p| format!("{p}\n")),
        );
    }
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for (i, d) in docs.into_iter().enumerate() {
        if i % 10 == 9 {
            test.push(d);
        } else {
            train.push(d);
        }
    }
    if train.is_empty() || test.is_empty() {
        bail!(
            "{}: too little text ({} documents in {} files; need at least 10)",
            path.display(),
            train.len() + test.len(),
            files.len()
        );
    }
    Ok(Corpus {
        train,
        test,
        source: format!("text {} ({} files)", path.display(), files.len()),
    })
}

/// Trains a byte-level BPE tokenizer of at most `vocab_size` tokens on `docs`.
pub fn train_tokenizer(docs: &[String], vocab_size: usize) -> Result<Tokenizer> {
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(2)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tok = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_normalizer(None)
    .with_pre_tokenizer(Some(ByteLevel::new(false, true, true).into()))
    .with_post_processor(None)
    .with_decoder(Some(ByteLevel::default().into()))
    .build()
    .map_err(|e| anyhow!("tokenizer: {e}"))?;
    tok.train(&mut trainer, docs.iter())
        .map_err(|e| anyhow!("training the tokenizer: {e}"))?;
    let json = tok.to_string(false).map_err(|e| anyhow!("{e}"))?;
    json.parse::<Tokenizer>()
        .map_err(|e| anyhow!("tokenizer round trip: {e}"))
}

/// The token stream of `docs` (concatenated) and its length in bytes.
pub fn encode(tok: &Tokenizer, docs: &[String]) -> Result<(Vec<u32>, usize)> {
    let mut ids = Vec::new();
    let mut bytes = 0;
    for d in docs {
        let e = tok
            .encode(d.as_str(), false)
            .map_err(|e| anyhow!("encoding: {e}"))?;
        ids.extend_from_slice(e.get_ids());
        bytes += d.len();
    }
    Ok((ids, bytes))
}

fn text_config(cfg: &RunConfig) -> Result<&TextArConfig> {
    match cfg.model.get::<TextArConfig>() {
        Some(c) => Ok(c),
        None => bail!("not a text model: '{}'", cfg.model.kind()),
    }
}

/// The corpus folder: `--data-dir`, else `data.dir`, else Debian's fortunes.
pub fn corpus_dir(cfg: &RunConfig, data_dir: Option<&Path>) -> PathBuf {
    data_dir
        .map(Path::to_path_buf)
        .or_else(|| cfg.data.dir.as_ref().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(FORTUNES_DIR))
}

/// Held-out metrics of a text `model` (its [`Model::eval_metrics`] give each window's summed
/// `nll_nats`) on a token stream of `bytes` bytes: `nll_nats_per_token`, `bits_per_token`,
/// `bits_per_byte`, `n_tokens`, `n_bytes`. Windows of `context + 1` tokens overlap by one, so
/// every token after the first is predicted once; the first is charged `ln V`.
pub fn evaluate_text(
    model: &dyn Model,
    mc: &TextArConfig,
    ids: &[u32],
    bytes: usize,
    batch_size: usize,
    device: &Device,
) -> Result<BTreeMap<String, f64>> {
    let ctx = mc.context;
    if ids.len() < 2 {
        bail!("held-out text has fewer than 2 tokens");
    }
    let window_nll = |v: Vec<u32>, rows: usize| -> Result<f64> {
        let cols = v.len() / rows;
        let batch = Batch {
            x: Tensor::from_vec(v, (rows, cols), device)?,
            labels: None,
        };
        let metrics = model.eval_metrics(&batch, &mut GmRng::new(0), &EvalOptions::default())?;
        let (_, nll) = metrics
            .iter()
            .find(|(k, _)| k == "nll_nats")
            .ok_or_else(|| anyhow!("a '{}' model gives no nll_nats", model.kind()))?;
        Ok(nll.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?)
    };
    let starts: Vec<usize> = (0..ids.len() - 1).step_by(ctx).collect();
    let mut total = (mc.vocab_size as f64).ln();
    let full: Vec<usize> = starts
        .iter()
        .copied()
        .filter(|s| s + ctx < ids.len())
        .collect();
    for chunk in full.chunks(batch_size.max(1)) {
        let v: Vec<u32> = chunk
            .iter()
            .flat_map(|&s| ids[s..s + ctx + 1].to_vec())
            .collect();
        total += window_nll(v, chunk.len())?;
    }
    if let Some(&s) = starts.iter().find(|&&s| s + ctx >= ids.len()) {
        total += window_nll(ids[s..].to_vec(), 1)?;
    }
    let ln2 = std::f64::consts::LN_2;
    Ok(BTreeMap::from([
        ("nll_nats_per_token".into(), total / ids.len() as f64),
        ("bits_per_token".into(), total / ln2 / ids.len() as f64),
        ("bits_per_byte".into(), total / ln2 / bytes as f64),
        ("n_tokens".into(), ids.len() as f64),
        ("n_bytes".into(), bytes as f64),
    ]))
}

/// The checkpoint metadata key of a text run's tokenizer (HuggingFace JSON).
pub const TOKENIZER_KEY: &str = "gm.tokenizer";

/// A corpus as token windows for the trainer: example `i` is the window of `context + 1`
/// tokens starting at token `i` of the training stream.
pub struct TextData {
    pub tokenizer: Tokenizer,
    pub train_ids: Vec<u32>,
    pub test_ids: Vec<u32>,
    /// UTF-8 bytes of the held-out documents (the denominator of bits per byte).
    pub test_bytes: usize,
    pub config: TextArConfig,
    source: String,
    docs: (usize, usize),
}

impl TextData {
    /// Reads the corpus and tokenizes it: with the tokenizer `saved` in a checkpoint's metadata
    /// (a resumed run), else with one trained on the training documents.
    pub fn load(
        cfg: &RunConfig,
        data_dir: Option<&Path>,
        saved: Option<&HashMap<String, String>>,
    ) -> Result<Self> {
        let mc = text_config(cfg)?.clone();
        let corpus = load_corpus(&corpus_dir(cfg, data_dir))?;
        let tokenizer: Tokenizer = match saved.and_then(|m| m.get(TOKENIZER_KEY)) {
            Some(t) => t
                .parse()
                .map_err(|e| anyhow!("the checkpoint's {TOKENIZER_KEY}: {e}"))?,
            None => train_tokenizer(&corpus.train, mc.vocab_size)?,
        };
        let (train_ids, _) = encode(&tokenizer, &corpus.train)?;
        let (test_ids, test_bytes) = encode(&tokenizer, &corpus.test)?;
        if train_ids.len() <= mc.context + 1 {
            bail!(
                "{}: {} training tokens, fewer than one window of model.context = {}",
                corpus.source,
                train_ids.len(),
                mc.context
            );
        }
        Ok(Self {
            tokenizer,
            train_ids,
            test_ids,
            test_bytes,
            config: mc,
            source: corpus.source,
            docs: (corpus.train.len(), corpus.test.len()),
        })
    }
}

impl TrainData for TextData {
    fn source(&self) -> &str {
        &self.source
    }

    fn describe(&self) -> String {
        format!(
            "{} — {} training / {} held-out documents; BPE with {} tokens: {} / {} tokens",
            self.source,
            self.docs.0,
            self.docs.1,
            self.tokenizer.get_vocab_size(true),
            self.train_ids.len(),
            self.test_ids.len()
        )
    }

    fn len(&self) -> usize {
        self.train_ids.len() - self.config.context
    }

    fn batch(&self, idx: &[usize], _rng: &mut GmRng, device: &Device) -> Result<Batch> {
        let w = self.config.context + 1;
        let v: Vec<u32> = idx
            .iter()
            .flat_map(|&s| self.train_ids[s..s + w].iter().copied())
            .collect();
        Ok(Batch {
            x: gm_core::traffic::upload(v, (idx.len(), w), device)?,
            labels: None,
        })
    }

    /// The whole held-out stream, every time (`train.eval_images` counts images only).
    fn evaluate(
        &self,
        model: &dyn Model,
        cfg: &RunConfig,
        _opts: &EvalOptions,
        device: &Device,
    ) -> Result<Option<BTreeMap<String, f64>>> {
        if self.test_ids.len() < 2 {
            return Ok(None);
        }
        let m = evaluate_text(
            model,
            &self.config,
            &self.test_ids,
            self.test_bytes,
            cfg.eval.batch_size,
            device,
        )?;
        Ok(Some(m))
    }

    fn checkpoint_meta(&self) -> Result<HashMap<String, String>> {
        let t = self
            .tokenizer
            .to_string(false)
            .map_err(|e| anyhow!("{e}"))?;
        Ok(HashMap::from([(TOKENIZER_KEY.to_string(), t)]))
    }
}

/// A trained `text-ar` model with its tokenizer.
pub struct TextCheckpoint {
    pub model: TextAr,
    pub tokenizer: Tokenizer,
    pub cfg: RunConfig,
    pub step: usize,
    pub path: PathBuf,
}

/// Whether a checkpoint (a run directory or a weights file) holds a model that reads text, from
/// its header only.
pub fn is_text_checkpoint(path: &Path) -> Result<bool> {
    if path.is_dir() && crate::diffusers::unet_folder(path).is_some() {
        return Ok(false);
    }
    let path = checkpoint::resolve(path)?;
    let meta = checkpoint::read_meta(&path)?;
    let cfg = meta.get("gm.config").ok_or_else(|| {
        anyhow!(
            "{}: no gm.config metadata (not a gm checkpoint?)",
            path.display()
        )
    })?;
    let cfg = RunConfig::from_toml_str(cfg, &[], &path.display().to_string())?;
    Ok(cfg.model.image_shape().is_none())
}

pub fn load_text_checkpoint(path: &Path, device: &Device) -> Result<TextCheckpoint> {
    let path = checkpoint::resolve(path)?;
    let l = read_safetensors(&path, device)?;
    let get = |k: &str| {
        l.meta
            .get(k)
            .ok_or_else(|| anyhow!("{}: no {k} metadata", path.display()))
    };
    let cfg = RunConfig::from_toml_str(get("gm.config")?, &[], &path.display().to_string())?;
    let tokenizer: Tokenizer = get(TOKENIZER_KEY)?
        .parse()
        .map_err(|e| anyhow!("{}: bad gm.tokenizer: {e}", path.display()))?;
    let vm = VarMap::new();
    let vb = gm_core::rng::seeded_var_builder(&vm, 0, DType::F32, device);
    let model = TextAr::new(text_config(&cfg)?.clone(), vb)?;
    set_vars(&vm, &l.tensors, "", &path, true)?;
    let step = l
        .meta
        .get("gm.step")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok(TextCheckpoint {
        model,
        tokenizer,
        cfg,
        step,
        path,
    })
}

/// Generates `n` continuations of `prompt` (`tokens` new tokens each); returns the texts.
pub fn generate(
    ck: &TextCheckpoint,
    prompt: &str,
    n: usize,
    tokens: usize,
    temperature: f64,
    top_k: usize,
    rng: &mut GmRng,
) -> Result<Vec<String>> {
    let mut ids = ck
        .tokenizer
        .encode(prompt, false)
        .map_err(|e| anyhow!("encoding the prompt: {e}"))?
        .get_ids()
        .to_vec();
    if ids.is_empty() {
        // An empty prompt starts after a newline, as documents do.
        ids = ck
            .tokenizer
            .encode("\n", false)
            .map_err(|e| anyhow!("{e}"))?
            .get_ids()
            .to_vec();
    }
    let p: Vec<u32> = (0..n).flat_map(|_| ids.clone()).collect();
    let prompt_t = Tensor::from_vec(p, (n, ids.len()), ck.model.device())?;
    let out = ck
        .model
        .generate(&prompt_t, tokens, temperature, top_k, rng)?;
    out.to_vec2::<u32>()?
        .iter()
        .map(|row| {
            ck.tokenizer
                .decode(row, false)
                .map_err(|e| anyhow!("decoding: {e}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Corpus {
        let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
        load_corpus(&readme).unwrap()
    }

    /// Byte-level BPE is lossless, so bits per byte count every byte of the text.
    #[test]
    fn tokenizer_round_trips_and_respects_the_vocabulary() {
        let c = corpus();
        let tok = train_tokenizer(&c.train, 400).unwrap();
        assert!(tok.get_vocab_size(true) <= 400);
        for d in c.test.iter().take(20) {
            let ids = tok.encode(d.as_str(), false).unwrap().get_ids().to_vec();
            assert_eq!(&tok.decode(&ids, false).unwrap(), d);
            assert!(ids.len() < d.len(), "no merges learned");
        }
    }

    /// A model with all-zero weights predicts uniformly: exactly `log₂ V` bits per token, and
    /// bits per byte = tokens · log₂ V / bytes.
    #[test]
    fn uniform_model_gives_log2_v_bits_per_token() {
        let c = corpus();
        let tok = train_tokenizer(&c.train, 300).unwrap();
        let (ids, bytes) = encode(&tok, &c.test).unwrap();
        let cfg = TextArConfig {
            vocab_size: 300,
            context: 16,
            channels: 4,
            layers: 2,
            ..Default::default()
        };
        let vb = candle_nn::VarBuilder::zeros(DType::F32, &Device::Cpu);
        let m = TextAr::new(cfg, vb).unwrap();
        let e = evaluate_text(&m, m.config(), &ids, bytes, 7, &Device::Cpu).unwrap();
        let want = 300f64.log2();
        assert!((e["bits_per_token"] - want).abs() < 1e-4, "{e:?}");
        let bpb = ids.len() as f64 * want / bytes as f64;
        assert!((e["bits_per_byte"] - bpb).abs() < 1e-4, "{e:?}");
        assert_eq!(e["n_tokens"], ids.len() as f64);
    }

    #[test]
    fn missing_corpus_says_how_to_get_one() {
        let e = load_corpus(Path::new("/nonexistent/corpus"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("apt-get install fortunes") && e.contains("--data-dir"),
            "{e}"
        );
    }
}
