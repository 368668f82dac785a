//! Unit tests of `spec`.

use super::*;

#[test]
fn gpu_models_parse_from_every_accepted_spelling() {
    let cases = [
        ("A100", GpuType::TeslaA100),
        ("a100", GpuType::TeslaA100),
        ("Tesla A100", GpuType::TeslaA100),
        ("tesla-a100", GpuType::TeslaA100),
        ("2", GpuType::TeslaA100),
        ("", GpuType::None),
        ("0", GpuType::None),
        ("V100", GpuType::TeslaV100),
        ("H100", GpuType::TeslaH100),
        ("t4", GpuType::TeslaT4),
        ("RTX 3090", GpuType::Rtx3090),
        ("3090", GpuType::Rtx3090),
        ("RTX 4060 Mobile", GpuType::Rtx4060Mobile),
        ("6", GpuType::Rtx4060Mobile),
    ];
    for (raw, want) in cases {
        assert_eq!(GpuType::parse(raw).unwrap(), want, "{raw}");
    }
    for raw in ["B200", "7", "-1", "A1000", "Tesla"] {
        assert!(GpuType::parse(raw).is_err(), "{raw} should be rejected");
    }
}

#[test]
fn integral_floats_become_integers_and_nothing_else_changes() {
    let raw = serde_json::json!({"port": 8080.0, "ratio": 0.5, "n": 3, "big": 1e300,
                                 "list": [2.0, "2.0", -0.0], "nested": {"x": 1e3}});
    assert_eq!(
        integral_numbers(raw),
        serde_json::json!({"port": 8080, "ratio": 0.5, "n": 3, "big": 1e300,
                           "list": [2, "2.0", 0], "nested": {"x": 1000}})
    );
}

#[test]
fn a_patch_changes_only_the_fields_it_names() {
    let spec = InstanceSpec {
        cpu: 2,
        memory_mb: 1024,
        gpu: GpuType::TeslaT4,
        image: "ubuntu:22.04".into(),
        config: serde_json::json!({"env": {"A": "1"}}),
    };
    let patch = SpecPatch { cpu: Some(4), memory_mb: Some(2048), ..SpecPatch::default() };
    let patched = patch.apply_to(&spec);
    assert_eq!((patched.cpu, patched.memory_mb), (4, 2048));
    assert_eq!((patched.gpu, patched.image.as_str()), (GpuType::TeslaT4, "ubuntu:22.04"));
    assert_eq!(patched.config, spec.config, "an absent config_json is kept");
    assert_eq!(SpecPatch::default().apply_to(&spec), spec);
    assert_eq!(SpecPatch::all(patched.clone()).apply_to(&spec), patched);
}

#[test]
fn gpu_codes_round_trip() {
    for gpu in GpuType::ALL {
        assert_eq!(GpuType::from_code(gpu.code()), Some(gpu));
    }
    assert_eq!(GpuType::from_code(7), None);
    assert_eq!(GpuType::from_code(-1), None);
}

#[test]
fn valid_image_references_are_accepted() {
    for image in [
        "ubuntu:22.04",
        "ubuntu",
        "library/ubuntu:latest",
        "nvcr.io/nvidia/pytorch:24.01-py3",
        "localhost:5000/team/app_v2:1.0",
        "registry.example.com/a/b/c",
        "ghcr.io/org/my-app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "my__app/x.y-z:_tag",
    ] {
        assert!(validate_image(image).is_ok(), "{image}");
    }
}

#[test]
fn invalid_image_references_are_refused() {
    for image in [
        "",
        "Ubuntu:22.04",
        "ubuntu:",
        "ubuntu::1",
        "-ubuntu",
        "ubuntu/",
        "/ubuntu",
        "ubu ntu",
        "ubuntu:22.04 ; rm -rf /",
        "ubuntu@sha256:xyz",
        "ubuntu:.bad",
        "a..b",
    ] {
        assert!(validate_image(image).is_err(), "{image:?} should be refused");
    }
}

#[test]
fn specs_are_checked_against_the_limits() {
    let limits = Limits {
        max_cpu: 8,
        max_memory_mb: 1024,
        max_name_len: 4,
        max_config_depth: 3,
        max_config_bytes: 64,
    };
    let spec = InstanceSpec {
        cpu: 8,
        memory_mb: 1024,
        gpu: GpuType::None,
        image: "ubuntu:22.04".into(),
        config: serde_json::json!({}),
    };
    assert!(spec.validate(&limits).is_ok());
    for bad in [
        InstanceSpec { cpu: 0, ..spec.clone() },
        InstanceSpec { cpu: 9, ..spec.clone() },
        InstanceSpec { memory_mb: 0, ..spec.clone() },
        InstanceSpec { memory_mb: 1025, ..spec.clone() },
        InstanceSpec { image: "BAD".into(), ..spec.clone() },
        InstanceSpec { config: serde_json::json!([1]), ..spec.clone() },
        InstanceSpec { config: serde_json::json!({"env": {"A\0": "1"}}), ..spec.clone() },
        InstanceSpec { config: serde_json::json!({"args": ["a\0"]}), ..spec.clone() },
        InstanceSpec { config: serde_json::json!({"a": {"b": {"c": {}}}}), ..spec.clone() },
        InstanceSpec { config: serde_json::json!({"a": [[[1]]]}), ..spec.clone() },
        InstanceSpec { config: serde_json::json!({"k": "x".repeat(60)}), ..spec.clone() },
    ] {
        assert!(matches!(bad.validate(&limits), Err(Error::InvalidSpec { .. })), "{bad:?}");
    }
    let deepest = serde_json::json!({"a": {"b": {"c": 1}}, "l": [[1]]});
    assert!(InstanceSpec { config: deepest, ..spec.clone() }.validate(&limits).is_ok());
    let largest = serde_json::json!({"k": "x".repeat(56)}); // {"k":"…"} is 64 bytes
    assert!(InstanceSpec { config: largest, ..spec.clone() }.validate(&limits).is_ok());
    assert!(validate_name("abcd", &limits).is_ok());
    assert!(validate_name("", &limits).is_err());
    assert!(validate_name("abcde", &limits).is_err());
    assert!(validate_name("a\nb", &limits).is_err());
    assert!(validate_text("user_id", "alice").is_ok());
    assert!(validate_text("user_id", "a\0b").is_err());
    assert!(validate_text("user_id", &"x".repeat(MAX_TEXT_LEN + 1)).is_err());
}

mod image_pattern {
    use proptest::prelude::*;

    use super::super::{IMAGE_PATTERN, validate_image};

    fn pattern() -> regex::Regex {
        regex::Regex::new(IMAGE_PATTERN).expect("IMAGE_PATTERN compiles")
    }

    /// Strings the pattern describes (proptest generates from it without its anchors).
    fn described() -> impl Strategy<Value = String> {
        let unanchored = &IMAGE_PATTERN[1..IMAGE_PATTERN.len() - 1];
        proptest::string::string_regex(unanchored).expect("a generator for IMAGE_PATTERN")
    }

    proptest! {
        #[test]
        fn strings_of_the_pattern_are_accepted(image in described()) {
            prop_assume!(image.len() <= 512);
            prop_assert!(validate_image(&image).is_ok(), "{image:?}");
        }

        #[test]
        fn pattern_and_validator_agree(image in "[a-zA-Z0-9._:/@+-]{1,24}") {
            prop_assert_eq!(pattern().is_match(&image), validate_image(&image).is_ok(), "{:?}", image);
        }

        #[test]
        fn near_misses_agree(image in "(localhost|[a-z]{1,3}\\.[a-z]{1,3}|[a-z_]{1,3})(:[0-9]{0,6})?/[a-z._-]{1,6}(:[a-zA-Z0-9._-]{0,4})?(@[a-z]{0,3}:[0-9a-fA-F]{30,34})?") {
            prop_assert_eq!(pattern().is_match(&image), validate_image(&image).is_ok(), "{:?}", image);
        }
    }
}
