//! A Hugging Face chat template, compiled with minijinja and configured the
//! way `transformers` configures Jinja2 (`trim_blocks`, `lstrip_blocks`,
//! loop controls, `raise_exception`, a `tojson` that writes what Python's
//! `json.dumps` writes, Python string methods, `strftime_now`).
//!
//! It renders text only; it never tokenizes.

use super::TokenizerError;
use minijinja::value::{Kwargs, Serde};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde_json::{Map, Value as Json};
use std::path::Path;

/// The name of the template used unless the request has tools and the model
/// ships a `tool_use` template (`transformers`' rule).
pub(super) const DEFAULT: &str = "default";
const TOOL_USE: &str = "tool_use";

/// `bos_token` and `eos_token`, which templates may write.
#[derive(Debug, Default)]
pub(super) struct SpecialTokens {
    pub(super) bos: Option<String>,
    pub(super) eos: Option<String>,
}

/// What one render needs from the request.
#[derive(Debug)]
pub(super) struct Inputs<'a> {
    pub(super) messages: &'a [Json],
    pub(super) add_generation_prompt: bool,
    pub(super) tools: Option<&'a Json>,
    /// `chat_template_kwargs`: extra template variables, as vLLM accepts.
    pub(super) kwargs: Map<String, Json>,
}

#[derive(Debug)]
pub(super) struct ChatTemplate {
    /// Holds every named template, compiled.
    env: Environment<'static>,
    has_tool_use: bool,
    special: SpecialTokens,
}

/// The error `raise_exception` returns, so a render failure can be told
/// apart as the template's own refusal by its type, not its message.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Raised(String);

impl ChatTemplate {
    /// Compiles every `(name, source)`; `path` names the file in errors.
    pub(super) fn compile(
        named: Vec<(String, String)>,
        special: SpecialTokens,
        path: &Path,
    ) -> Result<Self, TokenizerError> {
        let mut env = environment();
        let has_tool_use = named.iter().any(|(name, _)| name == TOOL_USE);
        if !named.iter().any(|(name, _)| name == DEFAULT) {
            return Err(TokenizerError::NoDefaultTemplate {
                path: path.to_path_buf(),
            });
        }
        for (name, source) in named {
            env.add_template_owned(name.clone(), source)
                .map_err(|source| TokenizerError::TemplateSyntax {
                    path: path.to_path_buf(),
                    name,
                    source,
                })?;
        }
        Ok(Self {
            env,
            has_tool_use,
            special,
        })
    }

    pub(super) fn render(&self, inputs: Inputs<'_>) -> Result<String, TokenizerError> {
        let has_tools = inputs.tools.is_some_and(|t| !t.is_null());
        let name = if has_tools && self.has_tool_use {
            TOOL_USE
        } else {
            DEFAULT
        };
        // The request's own variables win over chat_template_kwargs, as in
        // vLLM; the special tokens come first so kwargs may override them.
        let mut ctx = Map::new();
        let special = [("bos_token", &self.special.bos), ("eos_token", &self.special.eos)];
        for (key, token) in special {
            if let Some(token) = token {
                ctx.insert(key.into(), Json::String(token.clone()));
            }
        }
        ctx.extend(inputs.kwargs);
        ctx.insert("messages".into(), Json::Array(inputs.messages.to_vec()));
        ctx.insert("add_generation_prompt".into(), Json::Bool(inputs.add_generation_prompt));
        if let Some(tools) = inputs.tools {
            ctx.insert("tools".into(), tools.clone());
        }
        let template = self.env.get_template(name).map_err(render_error)?;
        template
            .render(Value::from(Serde(Json::Object(ctx))))
            .map_err(render_error)
    }
}

fn render_error(error: Error) -> TokenizerError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    while let Some(current) = cause {
        if let Some(Raised(message)) = current.downcast_ref::<Raised>() {
            return TokenizerError::TemplateRaised {
                message: message.clone(),
            };
        }
        cause = current.source();
    }
    TokenizerError::Render { source: error }
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    // transformers renders with trim_blocks and lstrip_blocks; templates are
    // written for that whitespace handling.
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .expect("the default delimiters are valid");
    env.set_syntax(syntax);
    // `message.content.strip()`, `.startswith(…)`, `.split(…)`, `.items()`:
    // templates are written against Python objects.
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |message: String| -> Result<Value, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, message.clone()).with_source(Raised(message)))
    });
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env
}

/// `transformers`' `tojson`: `json.dumps(value, ensure_ascii=False,
/// indent=indent)`, i.e. `", "` and `": "` separators and no HTML escaping
/// (minijinja's own filter escapes `<`, `>`, `&` and `'`, which would change
/// the prompt). Keys come out sorted: request JSON is kept in sorted maps.
fn tojson(value: &Value, indent: Option<usize>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match indent {
        Some(indent) => Some(indent),
        None => kwargs.get::<Option<usize>>("indent")?,
    };
    // Accepted for compatibility; we always write what these values ask for.
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let written = match indent {
        Some(n) => {
            let spaces = vec![b' '; n];
            let formatter = serde_json::ser::PrettyFormatter::with_indent(&spaces);
            serde::Serialize::serialize(value, &mut serde_json::Serializer::with_formatter(&mut out, formatter))
        }
        None => serde::Serialize::serialize(
            value,
            &mut serde_json::Serializer::with_formatter(&mut out, PythonSpaced),
        ),
    };
    written.map_err(|e| Error::new(ErrorKind::InvalidOperation, "cannot serialize to JSON").with_source(e))?;
    let text = String::from_utf8(out)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, "JSON is not UTF-8").with_source(e))?;
    Ok(Value::from_safe_string(text))
}

/// Python's default `json.dumps` separators: `", "` between items, `": "`
/// after keys.
struct PythonSpaced;

impl serde_json::ser::Formatter for PythonSpaced {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { writer.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { writer.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

/// `strftime_now(format)`, which vLLM and `transformers` give templates
/// (Llama 3 writes today's date into its system prompt). UTC, and only the
/// common directives: an unknown one is an error, not a wrong date.
fn strftime_now(format: &str) -> Result<String, Error> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, "the clock is before 1970").with_source(e))?;
    strftime(format, now.as_secs())
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];

/// Formats `unix_secs` (UTC) with `%Y %y %m %d %B %b %A %a %H %M %S %%`.
pub(super) fn strftime(format: &str, unix_secs: u64) -> Result<String, Error> {
    let days = unix_secs / 86_400;
    let secs = unix_secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    let weekday = WEEKDAYS[((days + 4) % 7) as usize]; // 1970-01-01 was a Thursday.
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let directive = chars.next();
        let piece = match directive {
            Some('Y') => year.to_string(),
            Some('y') => format!("{:02}", year % 100),
            Some('m') => format!("{month:02}"),
            Some('d') => format!("{day:02}"),
            Some('B') => month_name.to_string(),
            Some('b') => month_name[..3].to_string(),
            Some('A') => weekday.to_string(),
            Some('a') => weekday[..3].to_string(),
            Some('H') => format!("{:02}", secs / 3600),
            Some('M') => format!("{:02}", secs / 60 % 60),
            Some('S') => format!("{:02}", secs % 60),
            Some('%') => "%".to_string(),
            other => {
                let shown = other.map(String::from).unwrap_or_default();
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: unsupported directive %{shown}"),
                ));
            }
        };
        out.push_str(&piece);
    }
    Ok(out)
}

/// Days since 1970-01-01 to (year, month, day), after Howard Hinnant's
/// `civil_from_days`.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}
