//! Tests of the configuration loader: defaults, precedence, validation
//! messages, and the sync with docs/configuration.md.

// `figment::Jail` closures must return figment's own (large) error type.
#![allow(clippy::result_large_err)]

use super::*;

#[test]
fn defaults_match_the_documented_table() {
    let config = RuntimeConfig::default();
    assert_eq!(config.discovery_backend, DiscoveryBackend::Etcd);
    assert_eq!(config.request_plane, RequestPlaneKind::Tcp);
    assert_eq!(*config.tcp.host(), "127.0.0.1");
    assert_eq!(*config.tcp.port(), 0);
    assert_eq!(*config.tcp.max_message_size(), 32 * 1024 * 1024);
    assert_eq!(config.graceful_shutdown_timeout, Duration::from_secs(30));
    assert!(config.worker_threads >= 1);
}

#[test]
fn unknown_discovery_backend_names_variable_value_and_choices() {
    let err = RuntimeConfig::from_vars([(DISCOVERY_BACKEND, "zookeeper")]).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("DYN_DISCOVERY_BACKEND"), "{text}");
    assert!(text.contains("zookeeper"), "{text}");
    assert!(text.contains("mem, file, etcd, kubernetes"), "{text}");
}

#[test]
fn unknown_request_plane_names_variable_value_and_choices() {
    let err = RuntimeConfig::from_vars([(REQUEST_PLANE, "carrier-pigeon")]).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("DYN_REQUEST_PLANE") && text.contains("carrier-pigeon"),
        "{text}"
    );
    assert!(text.contains("tcp, http, nats"), "{text}");
}

#[test]
fn choices_are_case_insensitive() {
    let config = RuntimeConfig::from_vars([(DISCOVERY_BACKEND, "MEM"), (REQUEST_PLANE, "Tcp")]).unwrap();
    assert_eq!(config.discovery_backend, DiscoveryBackend::Mem);
}

#[test]
fn ports_above_i16_are_valid_and_above_u16_are_not() {
    let config = RuntimeConfig::from_vars([(TCP_RPC_PORT, "40000")]).unwrap();
    assert_eq!(*config.tcp.port(), 40000);
    let err = RuntimeConfig::from_vars([(TCP_RPC_PORT, "70000")]).unwrap_err();
    assert!(err.to_string().contains("DYN_TCP_RPC_PORT"), "{err}");
}

#[test]
fn an_advertised_address_is_host_and_port_or_a_clear_error() {
    let config = RuntimeConfig::from_vars([
        (TCP_RPC_ADVERTISE, "10.0.0.5:7000"),
        (HTTP_RPC_ADVERTISE, "[fd00::5]:7001"),
    ])
    .unwrap();
    assert_eq!(config.tcp().advertise().as_deref(), Some("10.0.0.5:7000"));
    assert_eq!(config.http().advertise().as_deref(), Some("[fd00::5]:7001"));
    let unset = RuntimeConfig::from_vars([(TCP_RPC_ADVERTISE, "")]).unwrap();
    assert_eq!(unset.tcp().advertise(), &None);
    for bad in [
        "10.0.0.5",
        "10.0.0.5:0",
        ":7000",
        "0.0.0.0:7000",
        "host:port",
        "h:70000",
    ] {
        let err = RuntimeConfig::from_vars([(TCP_RPC_ADVERTISE, bad)])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("DYN_TCP_RPC_ADVERTISE") && err.contains("host:port"),
            "{bad}: {err}"
        );
    }
    let err = RuntimeConfig::from_vars([(HTTP_RPC_ADVERTISE, "nowhere")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("DYN_HTTP_RPC_ADVERTISE"), "{err}");
}

#[test]
fn unreachable_bind_host_is_rejected() {
    for host in ["0.0.0.0", "::", "[::]", "::0", "0:0:0:0:0:0:0:0", " 0.0.0.0 "] {
        let err = RuntimeConfig::from_vars([(TCP_RPC_HOST, host)]).unwrap_err();
        assert!(err.to_string().contains("DYN_TCP_RPC_HOST"), "{err}");
        let err = RuntimeConfig::from_vars([(HTTP_RPC_HOST, host)]).unwrap_err();
        assert!(err.to_string().contains("DYN_HTTP_RPC_HOST"), "{err}");
    }
}

#[test]
fn durations_accept_humantime_and_plain_seconds() {
    assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
    assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
    assert_eq!(parse_duration("2"), Some(Duration::from_secs(2)));
    assert_eq!(parse_duration("0.25"), Some(Duration::from_millis(250)));
    assert_eq!(parse_duration("-1"), None);
    assert_eq!(parse_duration("soon"), None);
    let err = RuntimeConfig::from_vars([(GRACEFUL_SHUTDOWN_TIMEOUT, "soon")]).unwrap_err();
    assert!(
        err.to_string().contains("DYN_WORKER_GRACEFUL_SHUTDOWN_TIMEOUT"),
        "{err}"
    );
}

#[test]
fn etcd_settings_are_checked() {
    let config = RuntimeConfig::from_vars([(ETCD_ENDPOINTS, "http://10.0.0.1:2379, https://etcd:2379")]).unwrap();
    assert_eq!(config.etcd.endpoints, ["http://10.0.0.1:2379", "https://etcd:2379"]);
    let err = RuntimeConfig::from_vars([(ETCD_ENDPOINTS, "10.0.0.1:2379")]).unwrap_err();
    assert!(err.to_string().contains("ETCD_ENDPOINTS"), "{err}");
    let err = RuntimeConfig::from_vars([(ETCD_AUTH_USERNAME, "root")]).unwrap_err();
    assert!(err.to_string().contains("ETCD_AUTH_PASSWORD"), "{err}");
    let config = RuntimeConfig::from_vars([(ETCD_AUTH_USERNAME, "root"), (ETCD_AUTH_PASSWORD, "s3cret")]).unwrap();
    assert!(
        !format!("{config:?}").contains("s3cret"),
        "the password leaked into Debug"
    );
}

#[test]
fn credentials_in_urls_never_reach_debug_or_errors_and_etcd_passwords_need_tls_off_loopback() {
    assert_eq!(redact_url("nats://alice:s3cret@nats:4222"), "nats://***@nats:4222");
    assert_eq!(redact_url("http://u:p@[::1]:2379/x@y"), "http://***@[::1]:2379/x@y");
    assert_eq!(redact_url("https://etcd:2379"), "https://etcd:2379");
    let config = RuntimeConfig::from_vars([(NATS_SERVER, "nats://alice:s3cret@nats:4222")]).unwrap();
    assert!(!format!("{config:?}").contains("s3cret"), "{config:?}");
    let err = RuntimeConfig::from_vars([(NATS_SERVER, "nats://alice:s3cret@, bad")]).unwrap_err();
    assert!(!err.to_string().contains("s3cret"), "{err}");
    let err = RuntimeConfig::from_vars([(ETCD_ENDPOINTS, "http://root:s3cret@etcd:2379, nope")]).unwrap_err();
    assert!(
        !err.to_string().contains("s3cret") && err.to_string().contains("ETCD_ENDPOINTS"),
        "{err}"
    );

    let password = [(ETCD_AUTH_USERNAME, "root"), (ETCD_AUTH_PASSWORD, "s3cret")];
    let remote =
        RuntimeConfig::from_vars([(ETCD_ENDPOINTS, "http://10.0.0.1:2379")].into_iter().chain(password)).unwrap_err();
    assert!(
        remote.to_string().contains("in the clear to http://10.0.0.1:2379"),
        "{remote}"
    );
    for fine in [
        "https://10.0.0.1:2379",
        "http://127.0.0.1:2379",
        "http://localhost:2379",
    ] {
        RuntimeConfig::from_vars([(ETCD_ENDPOINTS, fine)].into_iter().chain(password)).unwrap();
    }
}

#[test]
fn status_server_settings_are_checked() {
    let config = RuntimeConfig::default();
    assert_eq!(config.system.port, None);
    assert!(!config.system.starting_ready && !config.system.canary_enabled);
    for off in ["-1", ""] {
        assert_eq!(
            RuntimeConfig::from_vars([(SYSTEM_PORT, off)]).unwrap().system.port,
            None
        );
    }
    assert_eq!(
        RuntimeConfig::from_vars([(SYSTEM_PORT, "40000")]).unwrap().system.port,
        Some(40000)
    );
    let err = RuntimeConfig::from_vars([(SYSTEM_STARTING_HEALTH_STATUS, "maybe")]).unwrap_err();
    assert!(err.to_string().contains("ready, notready"), "{err}");
    let err = RuntimeConfig::from_vars([(SYSTEM_HEALTH_PATH, "healthz")]).unwrap_err();
    assert!(err.to_string().contains("DYN_SYSTEM_HEALTH_PATH"), "{err}");
    let err = RuntimeConfig::from_vars([(SYSTEM_LIVE_PATH, "/health")]).unwrap_err();
    assert!(err.to_string().contains("DYN_SYSTEM_LIVE_PATH"), "{err}");
    let config = RuntimeConfig::from_vars([(HEALTH_CHECK_ENABLED, "TRUE")]).unwrap();
    assert!(config.system.canary_enabled);
    assert!(RuntimeConfig::from_vars([(HEALTH_CHECK_ENABLED, "sometimes")]).is_err());
}

#[test]
fn the_event_plane_follows_discovery_unless_set() {
    let mem = RuntimeConfig::from_vars([(DISCOVERY_BACKEND, "mem")]).unwrap();
    assert_eq!(mem.event_plane, EventPlaneKind::Zmq);
    assert_eq!(RuntimeConfig::default().event_plane, EventPlaneKind::Nats);
    let set = RuntimeConfig::from_vars([(DISCOVERY_BACKEND, "mem"), (EVENT_PLANE, "nats")]).unwrap();
    assert_eq!(set.event_plane, EventPlaneKind::Nats);
    let err = RuntimeConfig::from_vars([(EVENT_PLANE, "kafka")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("DYN_EVENT_PLANE") && err.contains("zmq, nats"), "{err}");
}

#[test]
fn nats_settings_are_checked() {
    let err = RuntimeConfig::from_vars([(NATS_SERVER, "localhost:4222")]).unwrap_err();
    assert!(err.to_string().contains("NATS_SERVER"), "{err}");
    let err = RuntimeConfig::from_vars([
        (NATS_AUTH_TOKEN, "t"),
        (NATS_AUTH_USERNAME, "u"),
        (NATS_AUTH_PASSWORD, "p"),
    ])
    .unwrap_err();
    assert!(err.to_string().contains("exactly one"), "{err}");
    let config = RuntimeConfig::from_vars([(NATS_AUTH_TOKEN, "s3cret")]).unwrap();
    assert!(!format!("{config:?}").contains("s3cret"));
}

#[test]
fn lease_ttl_below_a_second_is_rejected() {
    assert_eq!(RuntimeConfig::default().lease_ttl, Duration::from_secs(10));
    let err = RuntimeConfig::from_vars([(LEASE_TTL, "200ms")]).unwrap_err();
    assert!(err.to_string().contains("DYN_LEASE_TTL"), "{err}");
}

#[test]
fn etcd_endpoints_come_from_the_unprefixed_variable() {
    figment::Jail::expect_with(|jail| {
        jail.set_env("ETCD_ENDPOINTS", "http://127.0.0.1:23790");
        let config = RuntimeConfig::from_settings().map_err(|e| e.to_string())?;
        assert_eq!(config.etcd.endpoints, ["http://127.0.0.1:23790"]);
        Ok(())
    });
}

#[test]
fn empty_value_means_default() {
    let config = RuntimeConfig::from_vars([(REQUEST_PLANE, "")]).unwrap();
    assert_eq!(config.request_plane, RequestPlaneKind::Tcp);
}

#[test]
fn unknown_variable_is_an_error() {
    let err = RuntimeConfig::from_vars([("DYN_NOPE", "1")]).unwrap_err();
    assert!(err.to_string().contains("DYN_NOPE"), "{err}");
}

#[test]
fn toml_file_is_overridden_by_environment() {
    figment::Jail::expect_with(|jail| {
        jail.create_file("switchyard.toml", "discovery_backend = \"file\"\ntcp_rpc_port = 9100\n")?;
        jail.set_env("DYN_CONFIG_FILE", "switchyard.toml");
        jail.set_env("DYN_TCP_RPC_PORT", "9200");
        let config = RuntimeConfig::from_settings().map_err(|e| e.to_string())?;
        assert_eq!(config.discovery_backend, DiscoveryBackend::File);
        assert_eq!(*config.tcp.port(), 9200);
        Ok(())
    });
}

#[test]
fn bad_value_in_toml_names_the_file_as_its_source() {
    figment::Jail::expect_with(|jail| {
        jail.create_file("bad.toml", "request_plane = \"smoke\"\n")?;
        jail.set_env("DYN_CONFIG_FILE", "bad.toml");
        let err = RuntimeConfig::from_settings().unwrap_err().to_string();
        assert!(err.contains("DYN_REQUEST_PLANE") && err.contains("smoke"), "{err}");
        assert!(err.contains("TOML"), "{err}");
        Ok(())
    });
}

#[test]
fn missing_config_file_is_an_error() {
    figment::Jail::expect_with(|jail| {
        jail.set_env("DYN_CONFIG_FILE", "does-not-exist.toml");
        let err = RuntimeConfig::from_settings().unwrap_err();
        assert!(matches!(err, ConfigError::MissingFile { .. }));
        Ok(())
    });
}

/// `docs/configuration.md` lists exactly the variables in [`VARIABLES`].
#[test]
fn configuration_reference_lists_every_variable() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/configuration.md"))
        .expect("docs/configuration.md exists");
    for variable in VARIABLES {
        assert!(
            doc.contains(&format!("`{}`", variable.name)),
            "docs/configuration.md does not document {}",
            variable.name
        );
    }
    let documented: Vec<&str> = doc
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split('`').next())
        .filter(|name| name.starts_with("DYN_") || name.starts_with("ETCD_") || name.starts_with("NATS_"))
        .collect();
    for name in documented {
        assert!(
            VARIABLES.iter().any(|v| v.name == name),
            "docs/configuration.md documents {name}, which the code does not read"
        );
    }
}

#[test]
fn the_kubernetes_backend_needs_the_pod_identity_and_names_what_is_missing() {
    let err = RuntimeConfig::from_vars([(DISCOVERY_BACKEND, "kubernetes"), (POD_NAME, "worker-0")]).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ConfigError::MissingPodIdentity { .. }), "{err}");
    assert!(text.contains("POD_NAMESPACE, POD_UID are not set"), "{text}");
    assert!(!text.contains("POD_NAME,"), "POD_NAME is set: {text}");
    assert!(
        text.contains("metadata.uid"),
        "the message says where the values come from: {text}"
    );

    // Other backends do not need it; with all three set, it is there.
    assert!(RuntimeConfig::from_vars([(DISCOVERY_BACKEND, "etcd")]).is_ok());
    let config = RuntimeConfig::from_vars([
        (DISCOVERY_BACKEND, "kubernetes"),
        (POD_NAME, "worker-0"),
        (POD_NAMESPACE, "switchyard"),
        (POD_UID, "1f0e"),
    ])
    .unwrap();
    assert_eq!(
        config.pod_identity().unwrap(),
        PodIdentity::new("worker-0", "switchyard", "1f0e")
    );
}

#[test]
fn printing_the_settings_never_shows_a_secret() {
    let config = RuntimeConfig::from_vars([
        (ETCD_AUTH_USERNAME, "operator"),
        (ETCD_AUTH_PASSWORD, "etcd-secret-1"),
        (NATS_AUTH_TOKEN, "nats-secret-2"),
    ])
    .unwrap();
    let printed = format!("{config:?} {config:#?}");
    assert!(printed.contains("operator"), "the user name is fine to show: {printed}");
    for secret in ["etcd-secret-1", "nats-secret-2"] {
        assert!(!printed.contains(secret), "{secret} printed in {printed}");
    }
    let config =
        RuntimeConfig::from_vars([(NATS_AUTH_USERNAME, "app"), (NATS_AUTH_PASSWORD, "nats-secret-3")]).unwrap();
    assert!(!format!("{config:?}").contains("nats-secret-3"));
}

#[test]
fn request_plane_tls_needs_all_three_paths() {
    let err = RuntimeConfig::from_vars([(REQUEST_PLANE_TLS_CA_PATH, "/etc/ca.pem")]).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("DYN_REQUEST_PLANE_TLS_CA_PATH") && text.contains("all three"),
        "{text}"
    );
}

#[test]
fn a_missing_or_unreadable_tls_file_names_its_variable_and_path() {
    let dir = std::env::temp_dir().join(format!("switchyard-tls-config-{:x}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let missing = dir.join("missing.pem");
    let (garbage, missing) = (garbage.to_str().unwrap(), missing.to_str().unwrap());
    for (variable, vars) in [
        (
            REQUEST_PLANE_TLS_CA_PATH,
            [
                (REQUEST_PLANE_TLS_CA_PATH, missing),
                (REQUEST_PLANE_TLS_CERT_PATH, garbage),
                (REQUEST_PLANE_TLS_KEY_PATH, garbage),
            ],
        ),
        (
            REQUEST_PLANE_TLS_CA_PATH,
            [
                (REQUEST_PLANE_TLS_CA_PATH, garbage),
                (REQUEST_PLANE_TLS_CERT_PATH, garbage),
                (REQUEST_PLANE_TLS_KEY_PATH, garbage),
            ],
        ),
    ] {
        let err = RuntimeConfig::from_vars(vars).unwrap_err();
        let text = err.to_string();
        let path = vars[0].1;
        assert!(text.contains(variable) && text.contains(path), "{text}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_tls_key_that_is_not_a_key_names_the_key_variable() {
    let mesh = switchyard_test_support::etcd_server::TestCertificates::generate();
    let (ca, cert) = (mesh.ca.to_str().unwrap(), mesh.server_cert.to_str().unwrap());
    let err = RuntimeConfig::from_vars([
        (REQUEST_PLANE_TLS_CA_PATH, ca),
        (REQUEST_PLANE_TLS_CERT_PATH, cert),
        // A certificate where the key should be.
        (REQUEST_PLANE_TLS_KEY_PATH, cert),
    ])
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("DYN_REQUEST_PLANE_TLS_KEY_PATH") && text.contains(cert),
        "{text}"
    );
    // Another certificate's key does not match this one.
    let other = mesh.client_key.to_str().unwrap();
    let err = RuntimeConfig::from_vars([
        (REQUEST_PLANE_TLS_CA_PATH, ca),
        (REQUEST_PLANE_TLS_CERT_PATH, cert),
        (REQUEST_PLANE_TLS_KEY_PATH, other),
    ])
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("DYN_REQUEST_PLANE_TLS_KEY_PATH"), "{text}");
    let ok = RuntimeConfig::from_vars([
        (REQUEST_PLANE_TLS_CA_PATH, ca),
        (REQUEST_PLANE_TLS_CERT_PATH, cert),
        (REQUEST_PLANE_TLS_KEY_PATH, mesh.server_key.to_str().unwrap()),
    ])
    .unwrap();
    assert!(ok.tcp().tls().is_some());
}

#[test]
fn out_of_range_request_plane_limits_name_the_variable() {
    for (variable, value) in [
        (TCP_MAX_CONNECTIONS, "0"),
        (TCP_MAX_STREAMS_PER_CONNECTION, "-3"),
        (TCP_MAX_SEND_QUEUE, "10"),
        (TCP_WRITE_TIMEOUT, "0s"),
    ] {
        let err = RuntimeConfig::from_vars([(variable, value)]).unwrap_err();
        assert!(err.to_string().contains(variable), "{err}");
    }
}

#[test]
fn a_bad_nats_tls_file_names_its_variable_and_path() {
    let mesh = switchyard_test_support::etcd_server::TestCertificates::generate();
    let garbage = mesh.dir.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let missing = mesh.dir.join("missing.pem");
    let [ca, cert, key, garbage, missing] =
        [&mesh.ca, &mesh.client_cert, &mesh.client_key, &garbage, &missing].map(|path| path.to_str().unwrap());
    for (variable, path, vars) in [
        (NATS_AUTH_CA, missing, vec![(NATS_AUTH_CA, missing)]),
        (NATS_AUTH_CA, garbage, vec![(NATS_AUTH_CA, garbage)]),
        (
            NATS_AUTH_CLIENT_CERT,
            garbage,
            vec![
                (NATS_AUTH_CA, ca),
                (NATS_AUTH_CLIENT_CERT, garbage),
                (NATS_AUTH_CLIENT_KEY, key),
            ],
        ),
        (
            NATS_AUTH_CLIENT_KEY,
            cert,
            // A certificate where the key should be.
            vec![
                (NATS_AUTH_CA, ca),
                (NATS_AUTH_CLIENT_CERT, cert),
                (NATS_AUTH_CLIENT_KEY, cert),
            ],
        ),
    ] {
        let err = RuntimeConfig::from_vars(vars).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(variable) && text.contains(path), "{text}");
    }
    let ok = RuntimeConfig::from_vars([
        (NATS_AUTH_CA, ca),
        (NATS_AUTH_CLIENT_CERT, cert),
        (NATS_AUTH_CLIENT_KEY, key),
    ])
    .unwrap();
    assert!(ok.nats().tls().is_some());
    assert!(RuntimeConfig::default().nats().tls().is_none());
}

#[test]
fn a_nats_client_certificate_needs_its_key_and_the_ca() {
    for (vars, needed) in [
        (vec![(NATS_AUTH_CLIENT_CERT, "/c.pem")], "both, or neither"),
        (
            vec![(NATS_AUTH_CA, "/ca.pem"), (NATS_AUTH_CLIENT_KEY, "/k.pem")],
            "both, or neither",
        ),
        (
            vec![(NATS_AUTH_CLIENT_CERT, "/c.pem"), (NATS_AUTH_CLIENT_KEY, "/k.pem")],
            "NATS_AUTH_CA",
        ),
    ] {
        let text = RuntimeConfig::from_vars(vars).unwrap_err().to_string();
        assert!(text.contains("NATS_AUTH_CLIENT") && text.contains(needed), "{text}");
    }
}

/// Every numeric and duration setting fed what it does not take: each is a
/// configuration error naming the variable and what it allows, never a
/// panic, and the bounds themselves are accepted.
#[test]
fn every_out_of_range_setting_is_an_error_naming_the_variable_and_its_range() {
    const PORT: &str = "0-65535";
    const DURATION: &str = "at most 365 days";
    const ABOVE_ZERO: &str = "a duration above 0";
    let too_long = ["366 days", "1e19", "18446744073709551615s", "inf", "NaN", "-1", "soon"];
    let mut cases: Vec<(&str, &str, &str)> = vec![
        (TCP_RPC_PORT, "65536", PORT),
        (TCP_RPC_PORT, "-1", PORT),
        (HTTP_RPC_PORT, "70000", PORT),
        (SYSTEM_PORT, "65536", PORT),
        (SYSTEM_PORT, "-2", PORT),
        (TCP_MAX_MESSAGE_SIZE, "1023", "between 1024 and 4294967295"),
        (TCP_MAX_MESSAGE_SIZE, "4294967296", "between 1024 and 4294967295"),
        (TCP_STREAM_WINDOW, "0", "between 1 and 1048576"),
        (TCP_STREAM_WINDOW, "1048577", "between 1 and 1048576"),
        (TCP_MAX_CONNECTIONS, "0", "between 1 and 1048576"),
        (TCP_MAX_CONNECTIONS, "18446744073709551616", "between 1 and 1048576"),
        (TCP_MAX_STREAMS_PER_CONNECTION, "0", "between 1 and 1048576"),
        (TCP_MAX_STREAMS_PER_CONNECTION, "1048577", "between 1 and 1048576"),
        (TCP_MAX_SEND_QUEUE, "65535", "between 65536 and 1099511627776"),
        (TCP_MAX_SEND_QUEUE, "1099511627777", "between 65536 and 1099511627776"),
        (WORKER_THREADS, "0", "between 1 and 1024"),
        (WORKER_THREADS, "1025", "between 1 and 1024"),
        (LEASE_TTL, "0.5", "between 1s and 365 days"),
        (LEASE_TTL, "366 days", DURATION),
        (TCP_CONNECT_TIMEOUT, "0s", ABOVE_ZERO),
        (TCP_WRITE_TIMEOUT, "0", ABOVE_ZERO),
        (CANARY_WAIT_TIME, "0ms", ABOVE_ZERO),
        (HEALTH_CHECK_REQUEST_TIMEOUT, "0", ABOVE_ZERO),
    ];
    for variable in [
        LEASE_TTL,
        TCP_CONNECT_TIMEOUT,
        TCP_WRITE_TIMEOUT,
        CANARY_WAIT_TIME,
        HEALTH_CHECK_REQUEST_TIMEOUT,
        GRACEFUL_SHUTDOWN_TIMEOUT,
    ] {
        for value in too_long {
            cases.push((variable, value, DURATION));
        }
    }
    for (variable, value, allowed) in cases {
        let loaded = std::panic::catch_unwind(|| RuntimeConfig::from_vars([(variable, value)]))
            .unwrap_or_else(|_| panic!("{variable}={value} panicked"));
        let text = match loaded {
            Ok(_) => panic!("{variable}={value} was accepted"),
            Err(error) => error.to_string(),
        };
        assert!(
            text.contains(variable) && text.contains(allowed),
            "{variable}={value}: {text}"
        );
    }
    for (variable, value) in [
        (TCP_MAX_MESSAGE_SIZE, "4294967295"),
        (TCP_STREAM_WINDOW, "1048576"),
        (TCP_MAX_CONNECTIONS, "1048576"),
        (TCP_MAX_SEND_QUEUE, "1099511627776"),
        (WORKER_THREADS, "1024"),
        (LEASE_TTL, "1s"),
        (TCP_CONNECT_TIMEOUT, "365 days"),
        (GRACEFUL_SHUTDOWN_TIMEOUT, "0"),
        (SYSTEM_PORT, "-1"),
    ] {
        RuntimeConfig::from_vars([(variable, value)]).unwrap_or_else(|e| panic!("{variable}={value}: {e}"));
    }
}

/// Whatever a variable is given, loading the settings does not panic.
#[test]
fn no_value_of_any_variable_makes_loading_panic() {
    let values = [
        "",
        "0",
        "-1",
        "1e19",
        "18446744073709551616",
        "NaN",
        "inf",
        "365 days",
        "366 days",
        "\u{0}",
        "🦀",
        "/nonexistent/file.pem",
    ];
    for variable in VARIABLES {
        if variable.name == CONFIG_FILE {
            continue; // from_vars does not read the file
        }
        for value in values {
            let loaded = std::panic::catch_unwind(|| RuntimeConfig::from_vars([(variable.name, value)]));
            assert!(loaded.is_ok(), "{}={value:?} panicked", variable.name);
        }
    }
}

#[test]
fn durations_over_a_year_are_refused_by_the_flags_parser_too() {
    assert_eq!(parse_duration("365 days"), Some(MAX_DURATION));
    assert_eq!(parse_duration("31536001"), None);
    assert_eq!(parse_duration_in("31536000001", BareNumber::Milliseconds), None);
    assert!(BareNumber::Milliseconds.expected().contains("365 days"));
}
