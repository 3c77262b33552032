use super::*;

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

#[test]
fn a_managed_child_gets_prefix_caching_and_vllm_s_events_config_and_the_card_names_the_advertised_host() {
    let plan = managed_plan(&strings(&["--dtype", "half"]), true, None).unwrap();
    assert_eq!(plan.leading_args, ["--enable-prefix-caching"]);
    assert_eq!(plan.block_size, VLLM_BLOCK_SIZE);

    let ports = EventPorts {
        publish: 5557,
        replay: 5558,
    };
    let config: serde_json::Value = serde_json::from_str(&ports.vllm_config()).unwrap();
    assert_eq!(
        config,
        serde_json::json!({"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:5557",
                           "replay_endpoint": "tcp://*:5558", "topic": "kv-events"})
    );
    let source = ports.source("10.0.0.5");
    assert_eq!(source.endpoint, "tcp://10.0.0.5:5557");
    assert_eq!(source.replay_endpoint.as_deref(), Some("tcp://10.0.0.5:5558"));
    assert_eq!(source.topic, "kv-events");
    assert_eq!(ports.source("fd00::5").endpoint, "tcp://[fd00::5]:5557");
}

#[test]
fn the_user_s_own_prefix_caching_choice_and_block_size_win() {
    for given in [
        &["--enable-prefix-caching"][..],
        &["--no-enable-prefix-caching"],
        &["--enable-prefix-caching=false"],
    ] {
        assert!(
            managed_plan(&strings(given), true, None)
                .unwrap()
                .leading_args
                .is_empty()
        );
    }
    assert!(managed_plan(&[], false, None).unwrap().leading_args.is_empty());
    assert_eq!(
        managed_plan(&strings(&["--block-size", "32"]), true, None)
            .unwrap()
            .block_size,
        32
    );
    assert_eq!(
        managed_plan(&strings(&["--block-size=64"]), true, Some(64))
            .unwrap()
            .block_size,
        64
    );
    // The flag alone is passed on, so the children use what the cards say.
    let plan = managed_plan(&[], false, Some(32)).unwrap();
    assert_eq!(
        (plan.leading_args, plan.block_size),
        (strings(&["--block-size", "32"]), 32)
    );
}

#[test]
fn managed_settings_that_cannot_hold_are_refused() {
    let own = strings(&["--kv-events-config", "{}"]);
    assert_eq!(managed_plan(&own, true, None), Err(KvError::OwnEventsConfig));
    assert!(
        managed_plan(&own, false, None).is_ok(),
        "with events off the user's config is theirs"
    );
    assert_eq!(
        managed_plan(&strings(&["--block-size", "32"]), true, Some(16)),
        Err(KvError::BlockSizes { in_args: 32, flag: 16 })
    );
    let error = managed_plan(&strings(&["--block-size", "big"]), true, None).unwrap_err();
    assert_eq!(
        error.to_string(),
        "--vllm-arg --block-size \"big\" is not a positive number of tokens"
    );
}

#[test]
fn attach_endpoints_pair_with_servers_in_order() {
    let endpoints = strings(&["tcp://h1:5557", "tcp://[::1]:5557"]);
    let replays = strings(&["tcp://h1:5558", "ipc:///tmp/replay"]);
    let sources = attach_sources(&endpoints, &replays, "", 2).unwrap();
    let first = sources[0].as_ref().unwrap();
    assert_eq!(
        (first.endpoint.as_str(), first.replay_endpoint.as_deref()),
        ("tcp://h1:5557", Some("tcp://h1:5558"))
    );
    assert_eq!(sources[1].as_ref().unwrap().endpoint, "tcp://[::1]:5557");
    let without_replay = attach_sources(&endpoints, &[], "kv", 2).unwrap();
    assert!(
        without_replay
            .iter()
            .all(|s| s.as_ref().unwrap().replay_endpoint.is_none())
    );
    assert_eq!(attach_sources(&[], &[], "", 3).unwrap(), vec![None, None, None]);
}

#[test]
fn attach_endpoint_mistakes_name_the_flags_and_counts() {
    let error = attach_sources(&strings(&["tcp://h:1"]), &[], "", 2)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("--kv-events-endpoint names 1") && error.contains("--attach names 2"),
        "{error}"
    );
    let error = attach_sources(&strings(&["tcp://h:1"]), &strings(&["tcp://h:2", "tcp://h:3"]), "", 1)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("--kv-events-replay-endpoint names 2") && error.contains("--kv-events-endpoint names 1"),
        "{error}"
    );
    assert!(matches!(
        attach_sources(&[], &strings(&["tcp://h:2"]), "", 1),
        Err(KvError::ReplayCount { .. })
    ));
    for bad in [
        "tcp://*:5557",
        "h:5557",
        "tcp://h",
        "tcp://h:0",
        "tcp://h:99999",
        "udp://h:1",
        "tcp://[zz]:1",
        "ipc://",
    ] {
        let error = attach_sources(&strings(&[bad]), &[], "", 1).unwrap_err().to_string();
        assert!(
            error.contains(bad) && error.contains("tcp://HOST:PORT") && error.contains("not *"),
            "{bad}: {error}"
        );
    }
}

#[test]
fn a_tokenizer_dir_must_hold_tokenizer_json_and_is_named_absolutely() {
    assert_eq!(tokenizer(None), Ok(None));
    let dir = std::env::temp_dir().join(format!("switchyard-vllm-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let error = tokenizer(Some(&dir)).unwrap_err().to_string();
    assert!(
        error.contains(&*dir.to_string_lossy()) && error.contains("tokenizer.json"),
        "{error}"
    );
    std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
    let Some(TokenizerSpec::HfDir { path }) = tokenizer(Some(&dir)).unwrap() else {
        panic!("a Hugging Face directory");
    };
    assert!(Path::new(&path).is_absolute() && Path::new(&path).join("tokenizer.json").is_file());
    let _ = std::fs::remove_dir_all(&dir);
    assert!(tokenizer(Some(Path::new("/nonexistent/model"))).is_err());
}
