//! What an instance runs: its spec, GPU types, image references, and their validation.

use super::Error;

/// Bounds every spec and name must respect (`limits.*` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most CPU cores an instance may ask for.
    pub max_cpu: i32,
    /// Most memory (MB) an instance may ask for.
    pub max_memory_mb: i32,
    /// Longest name, in characters.
    pub max_name_len: usize,
    /// Deepest nesting of `config_json`: the object itself is depth 1, so `{"a": {}}` is
    /// 2. Stock protobuf decoders give up past 100 message levels, and every JSON level is
    /// three of them (`Struct`, its map entry, `Value`): a deeper config would make every
    /// list that includes it undecodable for them.
    pub max_config_depth: usize,
    /// Largest `config_json`, in bytes of compact JSON.
    pub max_config_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_cpu: 128,
            max_memory_mb: 1_048_576,
            max_name_len: 128,
            max_config_depth: 32,
            max_config_bytes: 64 * 1024,
        }
    }
}

/// GPU type, by the codes of the original service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum GpuType {
    /// No GPU (code 0).
    #[default]
    None,
    /// Tesla V100 (1).
    TeslaV100,
    /// Tesla A100 (2).
    TeslaA100,
    /// Tesla H100 (3).
    TeslaH100,
    /// Tesla T4 (4).
    TeslaT4,
    /// RTX 3090 (5).
    Rtx3090,
    /// RTX 4060 Mobile (6).
    Rtx4060Mobile,
}

impl GpuType {
    /// Every type, by code.
    pub const ALL: [GpuType; 7] = [
        GpuType::None,
        GpuType::TeslaV100,
        GpuType::TeslaA100,
        GpuType::TeslaH100,
        GpuType::TeslaT4,
        GpuType::Rtx3090,
        GpuType::Rtx4060Mobile,
    ];

    /// The stored code.
    pub fn code(self) -> i32 {
        self as i32
    }

    /// The type with `code`, if any.
    pub fn from_code(code: i32) -> Option<GpuType> {
        usize::try_from(code).ok().and_then(|i| GpuType::ALL.get(i).copied())
    }

    /// Full model name (`"Tesla A100"`); empty for none.
    pub fn model(self) -> &'static str {
        match self {
            GpuType::None => "",
            GpuType::TeslaV100 => "Tesla V100",
            GpuType::TeslaA100 => "Tesla A100",
            GpuType::TeslaH100 => "Tesla H100",
            GpuType::TeslaT4 => "Tesla T4",
            GpuType::Rtx3090 => "RTX 3090",
            GpuType::Rtx4060Mobile => "RTX 4060 Mobile",
        }
    }

    /// Short model name as producers send it (`"A100"`).
    pub fn short(self) -> &'static str {
        match self {
            GpuType::None => "",
            GpuType::TeslaV100 => "V100",
            GpuType::TeslaA100 => "A100",
            GpuType::TeslaH100 => "H100",
            GpuType::TeslaT4 => "T4",
            GpuType::Rtx3090 => "3090",
            GpuType::Rtx4060Mobile => "4060 Mobile",
        }
    }

    /// Parses a model as events carry it: the short model, the full name, any case, or
    /// the code as digits. Empty means none.
    ///
    /// # Errors
    /// `InvalidGpuType` for anything else.
    pub fn parse(raw: &str) -> Result<GpuType, Error> {
        let s = raw.trim();
        if s.is_empty() || s.eq_ignore_ascii_case("none") {
            return Ok(GpuType::None);
        }
        if s.bytes().all(|b| b.is_ascii_digit())
            && let Some(gpu) = s.parse().ok().and_then(GpuType::from_code)
        {
            return Ok(gpu);
        }
        let wanted = normalize_model(s);
        GpuType::ALL
            .into_iter()
            .skip(1)
            .find(|gpu| {
                wanted == normalize_model(gpu.model())
                    || wanted == normalize_model(gpu.short())
                    || wanted == format!("RTX{}", normalize_model(gpu.short()))
            })
            .ok_or_else(|| Error::InvalidGpuType { value: raw.to_owned() })
    }
}

fn normalize_model(s: &str) -> String {
    s.chars().filter(|c| !c.is_whitespace() && *c != '-').flat_map(char::to_uppercase).collect()
}

/// What an instance runs on and what it runs.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceSpec {
    /// CPU cores, at least 1.
    pub cpu: i32,
    /// Memory in MB, at least 1.
    pub memory_mb: i32,
    /// GPU type.
    pub gpu: GpuType,
    /// Container image reference.
    pub image: String,
    /// Free-form container configuration (a JSON object).
    pub config: serde_json::Value,
}

impl InstanceSpec {
    /// Checks the spec against `limits` and the image grammar.
    ///
    /// # Errors
    /// `InvalidSpec` naming the field.
    pub fn validate(&self, limits: &Limits) -> Result<(), Error> {
        if !(1..=limits.max_cpu).contains(&self.cpu) {
            return Err(Error::InvalidSpec {
                field: "cpu",
                message: format!("must be between 1 and {}, got {}", limits.max_cpu, self.cpu),
            });
        }
        if !(1..=limits.max_memory_mb).contains(&self.memory_mb) {
            return Err(Error::InvalidSpec {
                field: "memory",
                message: format!(
                    "must be between 1 and {} MB, got {}",
                    limits.max_memory_mb, self.memory_mb
                ),
            });
        }
        validate_image(&self.image)?;
        if !self.config.is_object() {
            return Err(Error::InvalidSpec {
                field: "config_json",
                message: "must be a JSON object".into(),
            });
        }
        if exceeds_depth(&self.config, limits.max_config_depth) {
            return Err(Error::InvalidSpec {
                field: "config_json",
                message: format!("must nest at most {} levels deep", limits.max_config_depth),
            });
        }
        let size = json_size(&self.config);
        if size > limits.max_config_bytes {
            return Err(Error::InvalidSpec {
                field: "config_json",
                message: format!(
                    "must be at most {} bytes as JSON, got {size}",
                    limits.max_config_bytes
                ),
            });
        }
        if contains_nul(&self.config) {
            return Err(Error::InvalidSpec {
                field: "config_json",
                message: "must not contain the NUL character (\\u0000)".into(),
            });
        }
        // The keys that reach the container must fit their schema.
        crate::biz::cluster::ContainerConfig::from_config(&self.config)?;
        Ok(())
    }
}

/// Whether `value` nests objects and arrays deeper than `max` levels (a scalar is 0, an
/// empty object 1).
fn exceeds_depth(value: &serde_json::Value, max: usize) -> bool {
    let children: Box<dyn Iterator<Item = &serde_json::Value>> = match value {
        serde_json::Value::Array(items) => Box::new(items.iter()),
        serde_json::Value::Object(map) => Box::new(map.values()),
        _ => return false,
    };
    max == 0 || children.into_iter().any(|child| exceeds_depth(child, max - 1))
}

/// Bytes of `value` as compact JSON, counted without building the text.
fn json_size(value: &serde_json::Value) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // Writing a Value into a sink cannot fail.
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

/// `value` with every float that holds an integer (within ±2^53, where floats are exact)
/// written as that integer. JSON has one number type; protobuf's `Struct` carries every
/// number as a double, so `8080` arrives as `8080.0`: stored and audited, it reads `8080`.
pub fn integral_numbers(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value as J;
    match value {
        J::Number(n) if n.is_f64() => match n.as_f64() {
            #[allow(clippy::cast_possible_truncation)] // integral and below 2^53: exact
            Some(f) if f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 => J::from(f as i64),
            _ => J::Number(n),
        },
        J::Array(items) => J::Array(items.into_iter().map(integral_numbers).collect()),
        J::Object(map) => {
            J::Object(map.into_iter().map(|(k, v)| (k, integral_numbers(v))).collect())
        }
        other => other,
    }
}

/// A change to some fields of a spec; the fields left `None` keep their values.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpecPatch {
    /// New CPU cores.
    pub cpu: Option<i32>,
    /// New memory, MB.
    pub memory_mb: Option<i32>,
    /// New GPU type.
    pub gpu: Option<GpuType>,
    /// New image.
    pub image: Option<String>,
    /// New `config_json`, replacing the whole object.
    pub config: Option<serde_json::Value>,
}

impl SpecPatch {
    /// Every field of `spec`: replaces the whole spec.
    pub fn all(spec: InstanceSpec) -> Self {
        Self {
            cpu: Some(spec.cpu),
            memory_mb: Some(spec.memory_mb),
            gpu: Some(spec.gpu),
            image: Some(spec.image),
            config: Some(spec.config),
        }
    }

    /// `spec` with this patch applied.
    pub fn apply_to(&self, spec: &InstanceSpec) -> InstanceSpec {
        InstanceSpec {
            cpu: self.cpu.unwrap_or(spec.cpu),
            memory_mb: self.memory_mb.unwrap_or(spec.memory_mb),
            gpu: self.gpu.unwrap_or(spec.gpu),
            image: self.image.clone().unwrap_or_else(|| spec.image.clone()),
            config: self.config.clone().unwrap_or_else(|| spec.config.clone()),
        }
    }
}

/// Whether a key or string anywhere in `value` holds U+0000, which PostgreSQL cannot
/// store in `jsonb` or `text`.
fn contains_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(contains_nul),
        serde_json::Value::Object(map) => {
            map.iter().any(|(key, value)| key.contains('\0') || contains_nul(value))
        }
        _ => false,
    }
}

/// Longest user id, request id or filter value, in characters.
pub const MAX_TEXT_LEN: usize = 256;

/// Checks an identifier or filter value from a client: at most [`MAX_TEXT_LEN`]
/// characters and no control characters (PostgreSQL cannot store NUL at all).
///
/// # Errors
/// `InvalidArgument` for `field`.
pub fn validate_text(field: &'static str, value: &str) -> Result<(), Error> {
    if value.chars().count() > MAX_TEXT_LEN {
        return Err(Error::invalid(field, format!("must be at most {MAX_TEXT_LEN} characters")));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    Ok(())
}

/// Checks an instance name: 1 to `limits.max_name_len` characters, no control characters.
///
/// # Errors
/// `InvalidArgument` for `name`.
pub fn validate_name(name: &str, limits: &Limits) -> Result<(), Error> {
    let len = name.chars().count();
    if len == 0 || len > limits.max_name_len {
        return Err(Error::invalid(
            "name",
            format!("must be 1 to {} characters, got {len}", limits.max_name_len),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(Error::invalid("name", "must not contain control characters"));
    }
    Ok(())
}

/// The references [`validate_image`] accepts, as one regular expression (published in the
/// OpenAPI document; the tests hold the two to the same answers). The length bound (1 to
/// 512 characters) is separate.
pub const IMAGE_PATTERN: &str = concat!(
    "^(?:",
    // A registry host: dotted labels, a port, or both, then the path.
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+(?::[0-9]{1,5})?",
    r"|[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?:[0-9]{1,5}",
    // ... or a first path component without '.' (which would make it a host).
    r"|[a-z0-9]+(?:(?:_|__|-+)[a-z0-9]+)*)",
    r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)+",
    // A single path component.
    r"|[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*",
    ")",
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?",
    r"(?:@[a-z0-9+._-]+:[A-Fa-f0-9]{32,})?$",
);

/// Checks a container image reference against the OCI distribution grammar:
/// `[registry[:port]/]path[:tag][@algorithm:digest]`, path components lower case.
///
/// # Errors
/// `InvalidSpec` for `image`, saying what is wrong.
pub fn validate_image(image: &str) -> Result<(), Error> {
    let bad = |why: &str| Error::InvalidSpec {
        field: "image",
        message: format!("{image:?} is not a valid image reference: {why}"),
    };
    if image.is_empty() || image.len() > 512 {
        return Err(bad("must be 1 to 512 characters"));
    }
    let (name_tag, digest) = match image.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (image, None),
    };
    if let Some(digest) = digest {
        let (algo, hex) =
            digest.split_once(':').ok_or_else(|| bad("digest needs algorithm:hex"))?;
        let algo_ok = !algo.is_empty()
            && algo
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+._-".contains(c));
        let hex_ok = hex.len() >= 32 && hex.chars().all(|c| c.is_ascii_hexdigit());
        if !algo_ok || !hex_ok {
            return Err(bad("malformed digest"));
        }
    }
    // A tag follows the last ':' that comes after the last '/'.
    let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name_tag[last_slash..].rfind(':') {
        Some(i) => (&name_tag[..last_slash + i], Some(&name_tag[last_slash + i + 1..])),
        None => (name_tag, None),
    };
    if let Some(tag) = tag {
        let mut chars = tag.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if !first_ok
            || tag.len() > 128
            || !chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        {
            return Err(bad("malformed tag"));
        }
    }
    let mut components: Vec<&str> = name.split('/').collect();
    // The first component is a registry host when it has a '.' or ':' or is localhost.
    if components.len() > 1 {
        let host = components[0];
        if host.contains('.') || host.contains(':') || host == "localhost" {
            let (h, port) = host.split_once(':').map_or((host, None), |(h, p)| (h, Some(p)));
            let host_ok = !h.is_empty()
                && h.split('.').all(|label| {
                    !label.is_empty()
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                        && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                });
            let port_ok = port.is_none_or(|p| {
                !p.is_empty() && p.len() <= 5 && p.chars().all(|c| c.is_ascii_digit())
            });
            if !host_ok || !port_ok {
                return Err(bad("malformed registry host"));
            }
            components.remove(0);
        }
    }
    for component in components {
        if !path_component_ok(component) {
            return Err(bad(
                "path components are lower-case letters and digits separated by '.', '_', '__' or '-'",
            ));
        }
    }
    Ok(())
}

fn path_component_ok(c: &str) -> bool {
    let bytes = c.as_bytes();
    if bytes.is_empty() || !is_alnum(bytes[0]) || !is_alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if is_alnum(bytes[i]) {
            i += 1;
            continue;
        }
        // A separator: '.', '_', '__' or a run of '-', followed by an alphanumeric.
        let start = i;
        match bytes[i] {
            b'.' => i += 1,
            b'_' => i += if bytes.get(i + 1) == Some(&b'_') { 2 } else { 1 },
            b'-' => {
                while bytes.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || !bytes.get(i).copied().is_some_and(is_alnum) {
            return false;
        }
    }
    true
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

#[cfg(test)]
mod tests {
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
}
