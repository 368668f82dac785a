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
mod tests;
