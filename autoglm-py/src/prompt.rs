//! Prompts as Python passes them: text, token ids, chat messages (with images), or a list of
//! those.
//!
//! Parsing happens while attached (it reads Python objects: an image part's `bytes`, a Pillow
//! image's pixels); reading image files, rendering the chat template, tokenizing and preprocessing
//! images happen later, detached, on plain Rust values.
//!
//! Image parts: `{"type": "image_url", "image_url": {"url": ...}}` (or a plain string URL) is
//! passed to the core as the OpenAI API has it: data URLs are decoded there, local paths read only
//! under the engine's `allowed_local_media_path`. `{"type": "image", "image": X}` with `X` an
//! encoded file (`bytes`, `bytearray`, `memoryview`), a path (`str`, `os.PathLike`; read by the
//! binding: the Python caller owns its files) or a `PIL.Image.Image` becomes a source-less
//! `{"type": "image"}` part, and `X` one of the images given to `Engine::render_chat` beside the
//! messages, in message order. A data URL or an `http(s)://` URL as `X` is left to the core.

use std::path::PathBuf;
use std::sync::Arc;

use autoglm_core::engine::ImageInput;
use autoglm_core::media::{ProcessedImage, RgbImage};
use autoglm_core::tokenizer::Tokenizer;
use autoglm_core::Engine as CoreEngine;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{
    PyBool, PyByteArray, PyBytes, PyDict, PyFloat, PyInt, PyList, PyMapping, PySequence, PyString,
    PyTuple,
};
use serde_json::{json, Map, Number, Value as Json};

use crate::errors::invalid;

/// One prompt, before tokenization.
#[derive(Debug, Clone)]
pub(crate) enum Prompt {
    /// Text, encoded without added special tokens (as the CLI does).
    Text(String),
    /// Token ids, used as they are.
    Ids(Vec<u32>),
    /// Chat messages (a JSON array), rendered through the model's chat template, and the images
    /// their source-less `{"type": "image"}` parts stand for, in order.
    Chat {
        messages: Json,
        images: Vec<GivenImage>,
    },
}

/// An image of a `{"type": "image", "image": X}` part, as parsed from `X`.
#[derive(Debug, Clone)]
pub(crate) enum GivenImage {
    /// Bytes or pixels, ready for the engine.
    Input(ImageInput),
    /// A file to read (detached); `at` names the part (`messages[i].content[j]`).
    File { path: PathBuf, at: String },
}

impl GivenImage {
    fn read(self) -> autoglm_core::Result<ImageInput> {
        match self {
            GivenImage::Input(im) => Ok(im),
            GivenImage::File { path, at } => {
                std::fs::read(&path).map(ImageInput::Encoded).map_err(|e| {
                    autoglm_core::Error::InvalidRequest(format!(
                        "{at}: cannot read the image file {}: {e}",
                        path.display()
                    ))
                })
            }
        }
    }
}

/// A prompt after tokenization: what the engine gets, and what the result reports.
#[derive(Debug, Clone)]
pub(crate) struct Tokenized {
    /// The prompt text (the rendered template for chat); `None` for token ids.
    pub(crate) text: Option<String>,
    /// What the engine is given.
    pub(crate) ids: Vec<u32>,
}

/// A prompt rendered and tokenized, with its images read but not yet preprocessed.
pub(crate) struct Prepared {
    /// The prompt text (the rendered template for chat); `None` for token ids.
    text: Option<String>,
    /// Token ids, one `<|image|>` per image (expanded by [`Prepared::expand`]).
    ids: Vec<u32>,
    images: Vec<ImageInput>,
}

/// A prompt ready for `Engine::submit_request`: expanded ids and preprocessed images.
pub(crate) struct Ready {
    pub(crate) prompt: Tokenized,
    pub(crate) images: Vec<Arc<ProcessedImage>>,
}

impl Prepared {
    fn ready(self, ids: Vec<u32>, images: Vec<Arc<ProcessedImage>>) -> Ready {
        Ready {
            prompt: Tokenized {
                text: self.text,
                ids,
            },
            images,
        }
    }

    /// Preprocesses the images on the engine's image threads, blocking (call detached), and
    /// expands their placeholders.
    pub(crate) fn expand(mut self, engine: &CoreEngine) -> autoglm_core::Result<Ready> {
        if self.images.is_empty() {
            let ids = std::mem::take(&mut self.ids);
            return Ok(self.ready(ids, Vec::new()));
        }
        let (ids, images) = engine.expand_images(&self.ids, &self.images)?;
        Ok(self.ready(ids, images))
    }

    /// [`Prepared::expand`] as a future, the work started on the engine's image threads at once
    /// (so the caller's thread, an event loop's, never preprocesses); dropping it stops the work.
    pub(crate) fn expand_async(
        mut self,
        engine: &CoreEngine,
    ) -> impl std::future::Future<Output = autoglm_core::Result<Ready>> + Send + 'static {
        let images = std::mem::take(&mut self.images);
        let work = (!images.is_empty())
            .then(|| engine.expand_images_async(std::mem::take(&mut self.ids), images));
        async move {
            match work {
                None => {
                    let ids = std::mem::take(&mut self.ids);
                    Ok(self.ready(ids, Vec::new()))
                }
                Some(work) => {
                    let (ids, images) = work.await?;
                    Ok(self.ready(ids, images))
                }
            }
        }
    }
}

const WHAT: &str = "a prompt is a str, a list of token ids, or a list of chat messages \
                    ({\"role\": ..., \"content\": ...} dicts); many prompts are a list of those";

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

fn is_list_like(obj: &Bound<'_, PyAny>) -> bool {
    obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>()
}

/// Parses `prompts`; the flag says whether it was a single prompt (so the caller returns one
/// result rather than a list).
pub(crate) fn parse_many(obj: &Bound<'_, PyAny>) -> PyResult<(Vec<Prompt>, bool)> {
    if is_list_like(obj) {
        let items: Vec<Bound<'_, PyAny>> = obj.extract()?;
        let many = items
            .first()
            .is_some_and(|f| f.is_instance_of::<PyString>() || is_list_like(f));
        if many {
            let prompts = items.iter().map(parse_one).collect::<PyResult<_>>()?;
            return Ok((prompts, false));
        }
    }
    Ok((vec![parse_one(obj)?], true))
}

/// Parses exactly one prompt.
pub(crate) fn parse_one(obj: &Bound<'_, PyAny>) -> PyResult<Prompt> {
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(Prompt::Text(s.to_str()?.to_owned()));
    }
    if !is_list_like(obj) {
        return Err(PyTypeError::new_err(format!(
            "{WHAT}; got {}",
            type_name(obj)
        )));
    }
    let items: Vec<Bound<'_, PyAny>> = obj.extract()?;
    match items.first() {
        None => Ok(Prompt::Ids(Vec::new())),
        Some(f) if f.is_instance_of::<PyInt>() => items
            .iter()
            .map(token_id)
            .collect::<PyResult<_>>()
            .map(Prompt::Ids),
        Some(f) if f.cast::<PyMapping>().is_ok() => {
            for m in &items {
                if m.cast::<PyMapping>().is_err() {
                    return Err(PyTypeError::new_err(format!(
                        "chat messages must all be dicts; got {}",
                        type_name(m)
                    )));
                }
            }
            let mut images = Vec::new();
            let messages = items
                .iter()
                .enumerate()
                .map(|(i, m)| message_json(i, m, &mut images))
                .collect::<PyResult<_>>()?;
            Ok(Prompt::Chat {
                messages: Json::Array(messages),
                images,
            })
        }
        Some(f) => Err(PyTypeError::new_err(format!(
            "{WHAT}; got a list of {}",
            type_name(f)
        ))),
    }
}

fn token_id(obj: &Bound<'_, PyAny>) -> PyResult<u32> {
    if obj.is_instance_of::<PyBool>() || !obj.is_instance_of::<PyInt>() {
        return Err(PyTypeError::new_err(format!(
            "token ids must be ints; got {}",
            type_name(obj)
        )));
    }
    let v: i128 = obj.extract()?;
    u32::try_from(v).map_err(|_| invalid(format!("prompt token id {v} is out of range")))
}

/// Converts JSON-like Python data (dict with str keys, list, tuple, str, int, float, bool, None).
pub(crate) fn to_json(obj: &Bound<'_, PyAny>) -> PyResult<Json> {
    if obj.is_none() {
        return Ok(Json::Null);
    }
    if let Ok(b) = obj.cast::<PyBool>() {
        return Ok(Json::Bool(b.is_true()));
    }
    if obj.is_instance_of::<PyInt>() {
        if let Ok(v) = obj.extract::<i64>() {
            return Ok(Json::from(v));
        }
        let v: u64 = obj.extract()?;
        return Ok(Json::from(v));
    }
    if let Ok(f) = obj.cast::<PyFloat>() {
        let v = f.value();
        return Number::from_f64(v)
            .map(Json::Number)
            .ok_or_else(|| invalid(format!("{v} cannot be represented in JSON")));
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(Json::String(s.to_str()?.to_owned()));
    }
    if let Ok(d) = obj.cast::<PyDict>() {
        let mut map = Map::new();
        for (k, v) in d.iter() {
            let key = k.cast::<PyString>().map_err(|_| {
                PyTypeError::new_err(format!(
                    "chat message keys must be str; got {}",
                    type_name(&k)
                ))
            })?;
            map.insert(key.to_str()?.to_owned(), to_json(&v)?);
        }
        return Ok(Json::Object(map));
    }
    if let Ok(m) = obj.cast::<PyMapping>() {
        return to_json(&PyDict::from_sequence(&m.items()?.into_any())?.into_any());
    }
    if is_list_like(obj) || obj.cast::<PySequence>().is_ok() {
        let items: Vec<Bound<'_, PyAny>> = obj.extract()?;
        return items
            .iter()
            .map(to_json)
            .collect::<PyResult<_>>()
            .map(Json::Array);
    }
    Err(PyTypeError::new_err(format!(
        "cannot pass a value of type {} to the chat template (use dict, list, str, int, float, \
         bool or None)",
        type_name(obj)
    )))
}

/// The items of a mapping with str keys, in order.
fn str_items<'py>(
    obj: &Bound<'py, PyAny>,
    what: &str,
) -> PyResult<Vec<(String, Bound<'py, PyAny>)>> {
    let dict = match obj.cast::<PyDict>() {
        Ok(d) => d.clone(),
        Err(_) => PyDict::from_sequence(&obj.cast::<PyMapping>()?.items()?.into_any())?,
    };
    dict.iter()
        .map(|(k, v)| {
            let key = k.cast::<PyString>().map_err(|_| {
                PyTypeError::new_err(format!("{what} keys must be str; got {}", type_name(&k)))
            })?;
            Ok((key.to_str()?.to_owned(), v))
        })
        .collect()
}

/// One chat message as JSON; the images of its `{"type": "image", "image": X}` parts go to
/// `images`.
fn message_json(i: usize, m: &Bound<'_, PyAny>, images: &mut Vec<GivenImage>) -> PyResult<Json> {
    let mut map = Map::new();
    for (key, v) in str_items(m, "chat message")? {
        let value = if key == "content" && is_list_like(&v) {
            let parts: Vec<Bound<'_, PyAny>> = v.extract()?;
            parts
                .iter()
                .enumerate()
                .map(|(j, p)| part_json(&format!("messages[{i}].content[{j}]"), p, images))
                .collect::<PyResult<Vec<_>>>()
                .map(Json::Array)?
        } else {
            to_json(&v)?
        };
        map.insert(key, value);
    }
    Ok(Json::Object(map))
}

/// A content part as JSON: an image part with a Python image becomes `{"type": "image"}`.
fn part_json(at: &str, p: &Bound<'_, PyAny>, images: &mut Vec<GivenImage>) -> PyResult<Json> {
    if p.cast::<PyMapping>().is_err() {
        // Not a part: the core names what is wrong with it.
        return to_json(p);
    }
    let items = str_items(p, "content part")?;
    let get = |k: &str| items.iter().find(|(key, _)| key == k).map(|(_, v)| v);
    let kind = get("type").and_then(|t| t.extract::<String>().ok());
    match kind.as_deref() {
        Some("image") => {
            let Some(x) = get("image").filter(|x| !x.is_none()) else {
                return Err(invalid(format!(
                    "{at}: an image part needs `image`: the encoded file (bytes), a path (str or \
                     os.PathLike), a PIL.Image.Image or a data: URL"
                )));
            };
            match given_image(at, x)? {
                Some(image) => {
                    images.push(image);
                    Ok(json!({"type": "image"}))
                }
                None => to_json(p),
            }
        }
        Some("image_url") => {
            let url = get("image_url").map(|u| match u.cast::<PyMapping>() {
                Ok(m) => m.get_item("url").ok(),
                Err(_) => Some(u.clone()),
            });
            if let Some(Some(url)) = url {
                if !url.is_instance_of::<PyString>() {
                    return Err(PyTypeError::new_err(format!(
                        "{at}.image_url.url must be a str (a data: URL, as in the OpenAI API); got \
                         {}; pass bytes, paths and PIL images as {{\"type\": \"image\", \
                         \"image\": ...}}",
                        type_name(&url)
                    )));
                }
            }
            to_json(p)
        }
        _ => to_json(p),
    }
}

/// `PIL.Image.Image`, if Pillow has been imported (an object can only be a Pillow image then).
fn pil_image_class(py: Python<'_>) -> PyResult<Option<Bound<'_, PyAny>>> {
    static MODULES: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let modules = MODULES.import(py, "sys", "modules")?;
    match modules.get_item("PIL.Image") {
        Ok(m) if !m.is_none() => Ok(m.getattr("Image").ok()),
        _ => Ok(None),
    }
}

/// A Pillow image as RGB pixels: transparent images composited over white as transformers'
/// `convert_to_rgb` does (so the pixels equal those of the same file decoded by the engine).
fn pil_rgb(at: &str, img: &Bound<'_, PyAny>) -> PyResult<RgbImage> {
    let py = img.py();
    let mode: String = img.getattr("mode")?.extract()?;
    let rgb = if mode == "RGB" {
        img.clone()
    } else {
        let pil = py.import("PIL.Image")?;
        let rgba = img.call_method1("convert", ("RGBA",))?;
        let size = rgba.getattr("size")?;
        let white = pil.call_method1("new", ("RGBA", size, (255, 255, 255)))?;
        pil.call_method1("alpha_composite", (white, rgba))?
            .call_method1("convert", ("RGB",))?
    };
    let (width, height): (usize, usize) = rgb.getattr("size")?.extract()?;
    let data = rgb
        .call_method0("tobytes")?
        .cast::<PyBytes>()?
        .as_bytes()
        .to_vec();
    if data.len() != width * height * 3 {
        return Err(invalid(format!(
            "{at}: the PIL image ({width}x{height}, mode {mode}) gave {} bytes of RGB pixels",
            data.len()
        )));
    }
    Ok(RgbImage {
        width,
        height,
        data,
    })
}

/// The image `X` of `{"type": "image", "image": X}`; `None` when the core takes it as it is (a
/// data URL, an `http(s)://` URL, an `{"url": ...}` object).
fn given_image(at: &str, x: &Bound<'_, PyAny>) -> PyResult<Option<GivenImage>> {
    if let Ok(b) = x.cast::<PyBytes>() {
        return Ok(Some(GivenImage::Input(ImageInput::Encoded(
            b.as_bytes().to_vec(),
        ))));
    }
    if let Ok(b) = x.cast::<PyByteArray>() {
        return Ok(Some(GivenImage::Input(ImageInput::Encoded(b.to_vec()))));
    }
    if x.is_instance_of::<pyo3::types::PyMemoryView>() {
        let b = x.call_method0("tobytes")?;
        let b = b.cast::<PyBytes>()?;
        return Ok(Some(GivenImage::Input(ImageInput::Encoded(
            b.as_bytes().to_vec(),
        ))));
    }
    if let Ok(s) = x.cast::<PyString>() {
        let s = s.to_str()?;
        if s.starts_with("data:") || s.starts_with("http://") || s.starts_with("https://") {
            return Ok(None);
        }
        let path = s.strip_prefix("file://").unwrap_or(s);
        return Ok(Some(GivenImage::File {
            path: PathBuf::from(path),
            at: at.to_owned(),
        }));
    }
    if x.cast::<PyMapping>().is_ok() {
        return Ok(None);
    }
    if let Some(cls) = pil_image_class(x.py())? {
        if x.is_instance(&cls)? {
            return Ok(Some(GivenImage::Input(ImageInput::Rgb(pil_rgb(at, x)?))));
        }
    }
    if x.hasattr("__fspath__")? {
        let path: PathBuf = x.extract()?;
        return Ok(Some(GivenImage::File {
            path,
            at: at.to_owned(),
        }));
    }
    Err(PyTypeError::new_err(format!(
        "{at}.image must be the encoded file (bytes), a path (str or os.PathLike), a \
         PIL.Image.Image or a data: URL; got {}",
        type_name(x)
    )))
}

/// Renders and tokenizes one prompt, reading its image files (run detached). Chats go through
/// `Engine::render_chat`, as the HTTP server's do.
pub(crate) fn prepare(
    engine: &CoreEngine,
    tok: Option<&Tokenizer>,
    prompt: Prompt,
) -> autoglm_core::Result<Prepared> {
    let need = || {
        tok.ok_or_else(|| {
            autoglm_core::Error::Tokenizer("this engine was built without a tokenizer".into())
        })
    };
    Ok(match prompt {
        Prompt::Ids(ids) => Prepared {
            text: None,
            ids,
            images: Vec::new(),
        },
        Prompt::Text(text) => Prepared {
            ids: need()?.encode(&text, false)?,
            text: Some(text),
            images: Vec::new(),
        },
        Prompt::Chat { messages, images } => {
            need()?;
            let given = images
                .into_iter()
                .map(GivenImage::read)
                .collect::<autoglm_core::Result<Vec<_>>>()?;
            let chat = engine.render_chat(&messages, None, true, given)?;
            Prepared {
                text: Some(chat.text),
                ids: chat.prompt,
                images: chat.images,
            }
        }
    })
}
