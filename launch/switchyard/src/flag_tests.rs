//! The components' flags and the variables they fall back to, parsed as
//! users give them: durations in the runtime's form or the old plain
//! numbers, bad values reported like bad runtime variables, and the
//! endpoint identity shared by both workers.

// figment::Jail's closures return figment's own (large) error type.
#![allow(clippy::result_large_err)]

use super::{Cli, Command, WorkerKind};
use clap::Parser;
use std::time::Duration;
use switchyard_frontend::FrontendArgs;
use switchyard_mocker_worker::MockerArgs;
use switchyard_runtime::config::args::EndpointArgs;
use switchyard_vllm::VllmArgs;

/// Runs `test` with an empty environment, set only by `test` through the
/// jail, and restored afterwards. Every test here parses inside one: the
/// jail's lock keeps a variable one test sets from reaching another.
fn isolated(test: impl FnOnce(&mut figment::Jail) -> figment::error::Result<()>) {
    figment::Jail::expect_with(|jail| {
        jail.clear_env();
        test(jail)
    });
}

fn parse(args: &[&str]) -> Result<Command, clap::Error> {
    Cli::try_parse_from(std::iter::once("switchyard").chain(args.iter().copied())).map(|cli| cli.command)
}

fn frontend(args: &[&str]) -> FrontendArgs {
    match parse(&[&["frontend"], args].concat()).unwrap() {
        Command::Frontend(args) => args,
        other => panic!("not the frontend: {other:?}"),
    }
}

fn mocker(args: &[&str]) -> MockerArgs {
    match parse(&[&["worker", "mocker"], args].concat()).unwrap() {
        Command::Worker(WorkerKind::Mocker(args)) => args,
        other => panic!("not the mocker: {other:?}"),
    }
}

fn vllm(args: &[&str]) -> VllmArgs {
    match parse(&[&["worker", "vllm", "--model", "m", "--managed"], args].concat()).unwrap() {
        Command::Worker(WorkerKind::Vllm(args)) => *args,
        other => panic!("not the vLLM worker: {other:?}"),
    }
}

#[test]
fn duration_flags_take_humantime_and_their_old_plain_numbers() {
    isolated(|_| {
        let args = frontend(&[
            "--stream-stall-timeout-secs",
            "10s",
            "--http-idle-timeout-secs",
            "500ms",
            "--router-max-wait-ms",
            "2s",
        ]);
        assert_eq!(args.stream_stall_timeout, Duration::from_secs(10));
        assert_eq!(args.http_idle_timeout, Duration::from_millis(500));
        assert_eq!(args.router_max_wait, Duration::from_secs(2));

        // The forms these flags took before: seconds (fractions too) and milliseconds.
        let args = frontend(&[
            "--stream-stall-timeout-secs",
            "2.5",
            "--http-idle-timeout-secs",
            "30",
            "--router-max-wait-ms",
            "250",
        ]);
        assert_eq!(args.stream_stall_timeout, Duration::from_millis(2500));
        assert_eq!(args.http_idle_timeout, Duration::from_secs(30));
        assert_eq!(args.router_max_wait, Duration::from_millis(250));

        let args = vllm(&[
            "--startup-timeout-secs",
            "10m",
            "--stop-grace-secs",
            "3",
            "--check-timeout-secs",
            "500ms",
            "--health-interval-ms",
            "200",
        ]);
        assert_eq!(args.startup_timeout, Duration::from_secs(600));
        assert_eq!(args.stop_grace, Duration::from_secs(3));
        assert_eq!(args.check_timeout, Duration::from_millis(500));
        assert_eq!(args.health_interval, Duration::from_millis(200));
        Ok(())
    });
}

#[test]
fn defaults_are_unchanged_and_default_impls_agree_with_the_flags() {
    isolated(|_| {
        let args = vllm(&[]);
        assert_eq!(args.startup_timeout, Duration::from_secs(600));
        assert_eq!(args.stop_grace, Duration::from_secs(4));
        assert_eq!(args.check_timeout, Duration::from_secs(5));
        assert_eq!(args.health_interval, Duration::from_secs(1));

        let parsed = frontend(&[]);
        let default = FrontendArgs::default();
        assert_eq!(format!("{parsed:?}"), format!("{default:?}"));
        assert_eq!(default.stream_stall_timeout, Duration::from_secs(60));
        assert_eq!(default.first_token_timeout, Duration::from_secs(120));
        assert_eq!(default.http_write_timeout, Duration::from_secs(30));
        assert_eq!(default.max_inflight_requests, 1024);
        assert!(default.api_keys.is_empty(), "open unless keys are given");
        assert_eq!(default.http_idle_timeout, Duration::from_secs(30));
        assert_eq!(default.router_max_wait, Duration::ZERO);
        assert_eq!(default.http_port, 8000);

        let parsed = mocker(&[]);
        let default = MockerArgs::default();
        assert_eq!(format!("{parsed:?}"), format!("{default:?}"));
        assert_eq!(
            default.engine_config(),
            switchyard_mocker::config::MockerConfig::default()
        );
        Ok(())
    });
}

#[test]
fn a_bad_duration_variable_names_the_variable_the_value_and_what_is_allowed() {
    let cases = [
        (
            &["frontend"][..],
            "DYN_HTTP_IDLE_TIMEOUT_SECS",
            "soon",
            "a duration above 0",
        ),
        (
            &["frontend"][..],
            "DYN_HTTP_IDLE_TIMEOUT_SECS",
            "0",
            "a duration above 0",
        ),
        (
            &["frontend"][..],
            "DYN_HTTP_BACKEND_STREAM_TIMEOUT_SECS",
            "-1",
            "a number of seconds",
        ),
        (
            &["frontend"][..],
            "DYN_ROUTER_MAX_WAIT_MS",
            "5 parsecs",
            "a number of milliseconds",
        ),
        (
            &["worker", "vllm", "--model", "m", "--managed"][..],
            "DYN_VLLM_STOP_GRACE_SECS",
            "4x",
            "a number of seconds",
        ),
        (
            &["worker", "vllm", "--model", "m", "--managed"][..],
            "DYN_VLLM_HEALTH_INTERVAL_MS",
            "often",
            "a number of milliseconds",
        ),
    ];
    for (command, variable, value, expected) in cases {
        isolated(|jail| {
            jail.set_env(variable, value);
            let error = parse(command).unwrap_err();
            assert_eq!(error.kind(), clap::error::ErrorKind::ValueValidation);
            let text = error.to_string();
            assert!(text.contains(&format!("{variable}={value:?}")), "{text}");
            assert!(
                text.contains(": expected a duration") && text.contains(expected),
                "{text}"
            );
            assert!(text.contains("`10s`, `500ms`"), "{text}");
            Ok(())
        });
    }
}

#[test]
fn both_workers_take_the_same_endpoint_identity_flags_and_variables() {
    let given = EndpointArgs {
        namespace: "prod".into(),
        component: "llama".into(),
        endpoint: "chat".into(),
    };
    isolated(|jail| {
        let flags = ["--namespace", "prod", "--component", "llama", "--endpoint", "chat"];
        assert_eq!(mocker(&flags).identity, given);
        assert_eq!(vllm(&flags).identity, given);
        assert_eq!(mocker(&[]).identity, EndpointArgs::default());
        assert_eq!(vllm(&[]).identity, EndpointArgs::default());

        jail.set_env("DYN_NAMESPACE", "prod");
        jail.set_env("DYN_COMPONENT", "llama");
        jail.set_env("DYN_ENDPOINT", "chat");
        assert_eq!(mocker(&[]).identity, given);
        assert_eq!(vllm(&[]).identity, given);
        // A flag on the command line wins over its variable.
        assert_eq!(mocker(&["--namespace", "dev"]).identity.namespace, "dev");
        // `Default` is the flags' defaults, whatever the environment holds.
        assert_eq!(EndpointArgs::default().namespace, "dynamo");
        Ok(())
    });
}
