//! The command-line side of configuration: what the components' clap
//! arguments share, so that they are written once and behave like the
//! runtime's variables. A duration flag parses as a runtime duration does
//! (`10s`, `500ms`, or a plain number), a bad value is reported in the same
//! words as a bad runtime variable, and each default is written once, in the
//! flag's `default_value`.
//!
//! It reads nothing itself: clap reads the flags and the `DYN_*` variables
//! they fall back to, once, at start-up (ADR 0008).

use super::{BareNumber, ConfigError, parse_duration_in};
use clap::builder::TypedValueParser;
use std::ffi::OsStr;
use std::time::Duration;

/// The endpoint a worker serves: `--namespace`, `--component` and
/// `--endpoint`. The mocker and the vLLM worker both flatten it
/// (`#[command(flatten)]`), so the three flags, their variables and their
/// defaults exist once.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct EndpointArgs {
    /// Namespace of the endpoint this worker serves.
    #[arg(long, env = "DYN_NAMESPACE", default_value = "dynamo")]
    pub namespace: String,
    /// Component of the endpoint this worker serves.
    #[arg(long, env = "DYN_COMPONENT", default_value = "backend")]
    pub component: String,
    /// Name of the endpoint this worker serves.
    #[arg(long, env = "DYN_ENDPOINT", default_value = "generate")]
    pub endpoint: String,
}

impl Default for EndpointArgs {
    fn default() -> Self {
        defaults()
    }
}

/// A flag group with every flag at its `default_value`, whatever the
/// environment holds. `Default` impls of flag groups call this, so a default
/// is written only in the flag's attribute.
///
/// # Panics
///
/// When a flag of `T` is required (it has no default to take).
pub fn defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let command = T::augment_args(clap::Command::new("defaults"))
        .no_binary_name(true)
        .mut_args(|arg| arg.env(None::<&'static str>));
    let matches = command
        .try_get_matches_from(std::iter::empty::<&str>())
        .unwrap_or_else(|error| panic!("a flag group without required flags: {error}"));
    T::from_arg_matches(&matches).unwrap_or_else(|error| panic!("defaults of a flag group: {error}"))
}

/// A [`Duration`] flag whose plain numbers count seconds (`--foo-secs`,
/// and flags that took `f64` or `u64` seconds before they took durations).
pub fn seconds() -> DurationArg {
    DurationArg {
        bare: BareNumber::Seconds,
        positive: false,
    }
}

/// A [`Duration`] flag whose plain numbers count milliseconds (`--foo-ms`).
pub fn milliseconds() -> DurationArg {
    DurationArg {
        bare: BareNumber::Milliseconds,
        positive: false,
    }
}

/// The value parser of a duration flag: `#[arg(value_parser = seconds())]`.
/// It accepts what runtime duration variables accept (humantime: `10s`,
/// `500ms`, `1m 30s`) and plain numbers in its [`BareNumber`] unit, so
/// settings written before the flag took durations keep working.
#[derive(Debug, Clone, Copy)]
pub struct DurationArg {
    bare: BareNumber,
    positive: bool,
}

impl DurationArg {
    /// Refuses zero as well.
    pub fn positive(self) -> Self {
        Self { positive: true, ..self }
    }

    /// Parses `text`, or says what is allowed.
    pub fn parse(&self, text: &str) -> Result<Duration, &'static str> {
        match parse_duration_in(text, self.bare) {
            Some(duration) if !(self.positive && duration.is_zero()) => Ok(duration),
            _ => Err(self.expected()),
        }
    }

    fn expected(&self) -> &'static str {
        match (self.positive, self.bare) {
            (false, bare) => bare.expected(),
            (true, BareNumber::Seconds) => {
                "a duration above 0 such as `10s`, `500ms` or a number of seconds, at most 365 days"
            }
            (true, BareNumber::Milliseconds) => {
                "a duration above 0 such as `10s`, `500ms` or a number of milliseconds, at most 365 days"
            }
        }
    }
}

impl TypedValueParser for DurationArg {
    type Value = Duration;

    fn parse_ref(
        &self,
        command: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<Duration, clap::Error> {
        let text = value.to_string_lossy();
        self.parse(&text).map_err(|expected| {
            let error = invalid_flag(arg, &text, expected);
            clap::Error::raw(clap::error::ErrorKind::ValueValidation, format!("{error}\n")).with_cmd(command)
        })
    }
}

/// The runtime's error for a bad flag value: the flag, the variable it falls
/// back to, the value and what is allowed. clap does not say whether the
/// value came from the command line or the variable, so both are named.
pub fn invalid_flag(arg: Option<&clap::Arg>, value: &str, expected: &str) -> ConfigError {
    ConfigError::InvalidFlag {
        flag: arg
            .and_then(|arg| arg.get_long())
            .map_or_else(|| "a flag".to_string(), |long| format!("--{long}")),
        variable: arg
            .and_then(|arg| arg.get_env())
            .map(|env| env.to_string_lossy().into_owned()),
        value: value.to_string(),
        expected: expected.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, clap::Parser)]
    struct Flags {
        #[arg(long, env = "DYN_TEST_GRACE_SECS", default_value = "4", value_parser = seconds())]
        grace_secs: Duration,
        #[arg(long, env = "DYN_TEST_INTERVAL_MS", default_value = "1000", value_parser = milliseconds())]
        interval_ms: Duration,
        #[arg(long, default_value = "30", value_parser = seconds().positive())]
        idle_secs: Duration,
        #[command(flatten)]
        identity: EndpointArgs,
    }

    /// The variables of these flags are set by no one (`DYN_TEST_*`), and the
    /// identity checks below give every flag, so the environment of the test
    /// run cannot change what is parsed.
    fn parse(args: &[&str]) -> Result<Flags, clap::Error> {
        Flags::try_parse_from(std::iter::once("flags").chain(args.iter().copied()))
    }

    #[test]
    fn durations_take_units_and_old_plain_numbers_keep_their_unit() {
        let flags = parse(&["--grace-secs", "10s", "--interval-ms", "500ms", "--idle-secs", "1m 30s"]).unwrap();
        assert_eq!(flags.grace_secs, Duration::from_secs(10));
        assert_eq!(flags.interval_ms, Duration::from_millis(500));
        assert_eq!(flags.idle_secs, Duration::from_secs(90));

        // What users wrote before: seconds for `-secs`, milliseconds for `-ms`.
        let flags = parse(&["--grace-secs", "2.5", "--interval-ms", "250"]).unwrap();
        assert_eq!(flags.grace_secs, Duration::from_millis(2500));
        assert_eq!(flags.interval_ms, Duration::from_millis(250));

        let flags = parse(&[]).unwrap();
        assert_eq!(flags.grace_secs, Duration::from_secs(4));
        assert_eq!(flags.interval_ms, Duration::from_secs(1));
        assert_eq!(flags.idle_secs, Duration::from_secs(30));
    }

    #[test]
    fn a_bad_duration_names_the_flag_the_variable_the_value_and_what_is_allowed() {
        let text = parse(&["--grace-secs", "soon"]).unwrap_err().to_string();
        assert!(
            text.contains(r#"invalid --grace-secs / DYN_TEST_GRACE_SECS="soon": expected a duration such as `10s`, `500ms` or a number of seconds"#),
            "{text}"
        );
        let text = parse(&["--interval-ms=-5"]).unwrap_err().to_string();
        assert!(text.contains(r#"DYN_TEST_INTERVAL_MS="-5""#), "{text}");
        assert!(text.contains("a number of milliseconds"), "{text}");
        let text = parse(&["--idle-secs", "0s"]).unwrap_err().to_string();
        assert!(
            text.contains(r#"invalid --idle-secs="0s": expected a duration above 0"#),
            "{text}"
        );
        assert!(
            parse(&["--grace-secs", "1e30"]).is_err(),
            "out of range is refused, not a panic"
        );
    }

    #[test]
    fn endpoint_identity_defaults_come_from_its_attributes_and_flags_override_them() {
        let identity = EndpointArgs::default();
        assert_eq!(
            identity,
            EndpointArgs {
                namespace: "dynamo".into(),
                component: "backend".into(),
                endpoint: "generate".into(),
            }
        );
        let flags = parse(&["--namespace", "ns", "--component", "c", "--endpoint", "e"]).unwrap();
        assert_eq!(
            (
                flags.identity.namespace.as_str(),
                flags.identity.component.as_str(),
                flags.identity.endpoint.as_str()
            ),
            ("ns", "c", "e")
        );
    }
}
