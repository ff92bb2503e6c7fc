//! The model's own chat template, rendered with minijinja the way transformers'
//! `apply_chat_template` renders it with Jinja2 (`trim_blocks`, `lstrip_blocks`, Python string
//! methods, `raise_exception`, special tokens in the context).

use std::path::Path;
use std::sync::RwLock;

use ahash::AHashMap;

use minijinja::{context, Environment, Error, ErrorKind, Value};

use crate::error::{DataError, Result};
use crate::record::{Message, Role};
use crate::special_tokens::SpecialTokens;

const TEMPLATE_NAME: &str = "chat_template";
/// Distinct (next role, text between turns) pairs remembered; real templates have a handful.
const CLOSING_CACHE_ENTRIES: usize = 4096;

/// Closing length by the role that follows (None: end of conversation), then by gap text.
type ClosingCache = AHashMap<Option<Role>, AHashMap<Box<str>, usize>>;

/// A compiled chat template plus the special tokens it may reference.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    specials: SpecialTokens,
    /// Length of an assistant turn's closing, by the role that follows and the exact text
    /// between the turn's content and the next content (see `label_mask`).
    closings: RwLock<ClosingCache>,
}

impl ChatTemplate {
    /// Load the template a transformers tokenizer folder carries: `chat_template.jinja` when
    /// present (transformers ≥ 4.43 saves it there), else `chat_template` in
    /// `tokenizer_config.json` (a string, or a list of named templates of which `default` is used).
    pub fn from_tokenizer_dir(dir: &Path, specials: SpecialTokens) -> Result<ChatTemplate> {
        let jinja = dir.join("chat_template.jinja");
        let source = if jinja.is_file() {
            std::fs::read_to_string(&jinja).map_err(|e| DataError::io(&jinja, e))?
        } else {
            template_from_config(dir)?
        };
        ChatTemplate::new(source, specials)
    }

    /// Compile `source`. `{% generation %}` markers (transformers' assistant-mask extension) are
    /// dropped: ferrotune finds assistant spans itself, for any template.
    pub fn new(source: String, specials: SpecialTokens) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("default delimiters are valid"),
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned(TEMPLATE_NAME, strip_generation_tags(&source))
            .map_err(|e| DataError::Template(format!("does not compile: {e:#}")))?;
        Ok(ChatTemplate {
            env,
            source,
            specials,
            closings: RwLock::new(AHashMap::new()),
        })
    }

    /// The template text as the tokenizer folder has it (part of the cache key).
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn specials(&self) -> &SpecialTokens {
        &self.specials
    }

    pub(crate) fn cached_closing(&self, next: Option<Role>, gap: &str) -> Option<usize> {
        let map = self.closings.read().unwrap_or_else(|e| e.into_inner());
        map.get(&next)?.get(gap).copied()
    }

    pub(crate) fn cache_closing(&self, next: Option<Role>, gap: &str, len: usize) {
        let mut map = self.closings.write().unwrap_or_else(|e| e.into_inner());
        let by_gap = map.entry(next).or_default();
        if by_gap.len() < CLOSING_CACHE_ENTRIES {
            by_gap.insert(Box::from(gap), len);
        }
    }

    /// Render a conversation to text; an `Err` carries the template's own message.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> std::result::Result<String, String> {
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_pairs([
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(m.content.as_str())),
                ])
            })
            .collect();
        let s = &self.specials;
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .expect("added in ChatTemplate::new");
        template
            .render(context! {
                messages => Value::from(msgs),
                add_generation_prompt => add_generation_prompt,
                bos_token => s.bos.as_deref().unwrap_or(""),
                eos_token => s.eos.as_deref().unwrap_or(""),
                unk_token => s.unk.as_deref().unwrap_or(""),
                pad_token => s.pad.as_deref().unwrap_or(""),
                tools => Value::from(()),
                documents => Value::from(()),
            })
            .map_err(|e| format!("{e:#}"))
    }
}

fn template_from_config(dir: &Path) -> Result<String> {
    let path = dir.join("tokenizer_config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| DataError::Tokenizer {
        path: path.clone(),
        message: format!("cannot read ({e}); a tokenizer folder needs tokenizer_config.json with a chat_template"),
    })?;
    let config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| DataError::Tokenizer {
            path: path.clone(),
            message: format!("invalid JSON: {e}"),
        })?;
    match config.get("chat_template") {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(serde_json::Value::Array(named)) => named
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template")?.as_str())
            .map(str::to_owned)
            .ok_or_else(|| DataError::Tokenizer {
                path: path.clone(),
                message: "chat_template is a list without a template named \"default\"".into(),
            }),
        _ => Err(DataError::Tokenizer {
            path,
            message: "no chat_template (and no chat_template.jinja beside it); use a chat model's tokenizer".into(),
        }),
    }
}

/// Remove `{% generation %}` / `{% endgeneration %}` (any whitespace control) from a template.
fn strip_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start..].find("%}") else {
            break;
        };
        let tag = &rest[start + 2..start + len];
        let word = tag.trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..start]);
        if word != "generation" && word != "endgeneration" {
            out.push_str(&rest[start..start + len + 2]);
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Role;

    fn msg(role: Role, content: &str) -> Message {
        Message {
            role,
            content: content.into(),
        }
    }

    fn specials() -> SpecialTokens {
        SpecialTokens {
            eos: Some("<|endoftext|>".into()),
            ..Default::default()
        }
    }

    #[test]
    fn python_string_methods_and_trim_blocks_work() {
        let src = "{% for m in messages %}\n  {{ m.role.upper() }}:{{ m['content'].strip() }}|\n{% endfor %}{{ eos_token }}";
        let t = ChatTemplate::new(src.into(), specials()).unwrap();
        let out = t
            .render(
                &[msg(Role::User, "  hi "), msg(Role::Assistant, "yo")],
                false,
            )
            .unwrap();
        // Expected value from Jinja2 (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks).
        assert_eq!(out, "  USER:hi|\n  ASSISTANT:yo|\n<|endoftext|>");
    }

    #[test]
    fn raise_exception_becomes_an_error_with_its_message() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('must start with user') }}{% endif %}";
        let t = ChatTemplate::new(src.into(), specials()).unwrap();
        let err = t.render(&[msg(Role::Assistant, "x")], false).unwrap_err();
        assert!(err.contains("must start with user"), "{err}");
    }

    #[test]
    fn generation_markers_are_ignored() {
        let src = "{% for m in messages %}{%- generation -%}{{ m.content }}{% endgeneration %}{% endfor %}";
        let t = ChatTemplate::new(src.into(), specials()).unwrap();
        assert_eq!(t.render(&[msg(Role::Assistant, "a")], false).unwrap(), "a");
    }

    #[test]
    fn a_template_that_does_not_compile_is_a_clear_error() {
        let err = ChatTemplate::new("{% for %}".into(), specials())
            .err()
            .unwrap();
        assert!(err.to_string().contains("does not compile"), "{err}");
    }
}
