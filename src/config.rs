//! Stage configs: JSON files with `--set key.path=value` overrides, into one serde struct per
//! stage (`deny_unknown_fields`), with errors that name the file and the field.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::Value;

/// A config that could not be read or does not fit its struct.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    ///
    /// The OS error is part of the message and not also a `source()` (it would print twice in
    /// an error chain).
    #[error("{file}: {error}")]
    Io {
        /// The file.
        file: String,
        /// The OS error.
        error: std::io::Error,
    },
    /// The file is not JSON.
    #[error("{file}: line {line}, column {column}: {msg}")]
    Syntax {
        /// The file.
        file: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        msg: String,
    },
    /// A field is missing, unknown or of the wrong type.
    #[error("{file}: field `{field}`: {msg}")]
    Field {
        /// The file (or `--set` for overrides).
        file: String,
        /// Dotted path of the field.
        field: String,
        /// What is wrong.
        msg: String,
    },
    /// A `--set` argument is not `key.path=value`.
    #[error("--set {0:?}: expected key.path=value")]
    BadOverride(String),
}

/// Reads `path` (or `{}` when `None`), applies the `--set` overrides in order, and
/// deserialises into `T`. Override values are parsed as JSON (`3`, `true`, `[1,2]`,
/// `"text"`), falling back to a plain string (`--set data.path=corpus.txt`).
pub fn load<T: DeserializeOwned>(path: Option<&Path>, overrides: &[String]) -> Result<T, ConfigError> {
    let file = path.map_or_else(|| "<defaults>".to_string(), |p| p.display().to_string());
    let mut value = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|error| ConfigError::Io { file: file.clone(), error })?;
            serde_json::from_str(crate::data::strip_bom(&text)).map_err(|e| ConfigError::Syntax {
                file: file.clone(),
                line: e.line(),
                column: e.column(),
                msg: e.to_string(),
            })?
        }
        None => Value::Object(Default::default()),
    };
    for o in overrides {
        apply_override(&mut value, o)?;
    }
    from_value(value, &file).map_err(|e| blame_override(e, overrides))
}

/// Names the `--set` argument behind a field error when the field came from one (the last
/// override whose key is the field, or a field inside it, or an object holding it), so that
/// `--set polcy=x` is not reported as a fault of the config file.
fn blame_override(error: ConfigError, overrides: &[String]) -> ConfigError {
    let ConfigError::Field { file, field, msg } = error else { return error };
    let related =
        |key: &str| key == field || field.starts_with(&format!("{key}.")) || key.starts_with(&format!("{field}."));
    let blamed = overrides.iter().rev().find(|o| o.split_once('=').is_some_and(|(key, _)| related(key)));
    match blamed {
        Some(o) => ConfigError::Field { file: format!("--set {o}"), field, msg },
        None => ConfigError::Field { file, field, msg },
    }
}

/// Deserialises a JSON value, reporting the dotted path of the offending field.
pub fn from_value<T: DeserializeOwned>(value: Value, file: &str) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let (field, msg) = (e.path().to_string(), e.inner().to_string());
        let msg = with_hint(&field, msg);
        ConfigError::Field { file: file.to_string(), field, msg }
    })
}

/// Adds what to do instead to the errors of fields that moved.
fn with_hint(field: &str, msg: String) -> String {
    let schedule_lr = field == "schedule.lr" || field.ends_with(".schedule.lr");
    if schedule_lr && msg.starts_with("unknown field `lr`") {
        return format!("{msg} (the peak learning rate is `optim.lr`; the schedule only shapes it)");
    }
    msg
}

/// Sets `a.b.c=value` inside `root`, creating objects along the way.
pub fn apply_override(root: &mut Value, assignment: &str) -> Result<(), ConfigError> {
    let (key, raw) = assignment.split_once('=').ok_or_else(|| ConfigError::BadOverride(assignment.into()))?;
    if key.is_empty() || key.split('.').any(str::is_empty) {
        return Err(ConfigError::BadOverride(assignment.into()));
    }
    let parsed = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()));
    let mut node = root;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        if !node.is_object() {
            return Err(ConfigError::Field {
                file: "--set".into(),
                field: parts[..i].join("."),
                msg: "is not an object, cannot set a field inside it".into(),
            });
        }
        let map = node.as_object_mut().expect("checked");
        if i + 1 == parts.len() {
            map.insert(part.to_string(), parsed);
            return Ok(());
        }
        node = map.entry(part.to_string()).or_insert_with(|| Value::Object(Default::default()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        lr: f64,
        #[serde(default)]
        betas: Vec<f64>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        name: String,
        steps: usize,
        optim: Inner,
    }

    #[test]
    fn overrides_create_and_replace_nested_fields() {
        let mut v: Value = serde_json::json!({"name": "a", "steps": 1, "optim": {"lr": 0.1}});
        apply_override(&mut v, "steps=20").unwrap();
        apply_override(&mut v, "optim.lr=3e-4").unwrap();
        apply_override(&mut v, "optim.betas=[0.9,0.95]").unwrap();
        apply_override(&mut v, "name=run one").unwrap();
        let c: Cfg = from_value(v, "x.json").unwrap();
        assert_eq!(c, Cfg { name: "run one".into(), steps: 20, optim: Inner { lr: 3e-4, betas: vec![0.9, 0.95] } });
        assert!(apply_override(&mut serde_json::json!({}), "novalue").is_err());
        assert!(apply_override(&mut serde_json::json!({"a": 1}), "a.b=2").is_err());
    }

    #[test]
    fn errors_name_the_file_and_field() {
        let v = serde_json::json!({"name": "a", "steps": 1, "optim": {"lr": "fast"}});
        let e = from_value::<Cfg>(v, "cfg.json").unwrap_err().to_string();
        assert!(e.contains("cfg.json") && e.contains("optim.lr"), "{e}");
        let v = serde_json::json!({"name": "a", "steps": 1, "optim": {"lr": 1.0, "momentum": 2}});
        let e = from_value::<Cfg>(v, "cfg.json").unwrap_err().to_string();
        assert!(e.contains("optim") && e.contains("momentum"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.json");
        std::fs::write(&p, "{\n  \"name\": ,\n}").unwrap();
        let e = load::<Cfg>(Some(&p), &[]).unwrap_err().to_string();
        assert!(e.contains("bad.json") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn errors_from_overrides_name_the_override() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cfg.json");
        std::fs::write(&p, r#"{"name": "a", "steps": 1, "optim": {"lr": 0.1}}"#).unwrap();
        let sets = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let e = load::<Cfg>(Some(&p), &sets(&["steps=2", "stpes=3"])).unwrap_err().to_string();
        assert!(e.starts_with("--set stpes=3: field `stpes`"), "{e}");
        let e = load::<Cfg>(Some(&p), &sets(&["optim.lr=fast"])).unwrap_err().to_string();
        assert!(e.starts_with("--set optim.lr=fast: field `optim.lr`"), "{e}");
        let e = load::<Cfg>(Some(&p), &sets(&["optim={\"momentum\": 1}"])).unwrap_err().to_string();
        assert!(e.starts_with("--set optim="), "{e}");
        // A fault of the file itself is still the file's, whatever else is set.
        std::fs::write(&p, r#"{"name": "a", "steps": "many", "optim": {"lr": 0.1}}"#).unwrap();
        let e = load::<Cfg>(Some(&p), &sets(&["optim.lr=0.2"])).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}: field `steps`", p.display())), "{e}");
    }

    #[test]
    fn a_byte_order_mark_is_not_part_of_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cfg.json");
        std::fs::write(&p, "\u{feff}{\"name\": \"a\", \"steps\": 1, \"optim\": {\"lr\": 0.1}}\r\n").unwrap();
        assert_eq!(load::<Cfg>(Some(&p), &[]).unwrap().steps, 1);
    }
}
