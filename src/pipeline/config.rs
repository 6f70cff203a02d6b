//! The YAML configuration. Unknown keys are errors that name the closest valid key; the whole
//! pipeline is validated when the config is loaded, before any model or data is read.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Insert Q/DQ nodes. Quantization lands with the main-job issue: until then only `false`
    /// is accepted.
    #[serde(default = "default_true")]
    pub quantize: bool,
    /// Graph passes to run, in order, by name (see `onnxq passes`).
    #[serde(default)]
    pub passes: Vec<String>,
}

fn default_true() -> bool {
    true
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::config(path, format!("cannot read the config: {e}")))?;
        Config::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config> {
        let config: Config = if text.trim().is_empty() {
            serde_yaml::from_str("{}")
        } else {
            serde_yaml::from_str(text)
        }
        .map_err(|e| Error::config(path, explain_yaml_error(&e.to_string())))?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        if self.quantize {
            return Err(Error::config(
                path,
                "`quantize: true` (the default) is not available yet in this version of onnxq; set `quantize: false` to run the passes and write the model back",
            ));
        }
        for name in &self.passes {
            if crate::passes::create(name).is_none() {
                let known = crate::passes::NAMES;
                let hint = closest(name, known)
                    .map(|c| format!(" (did you mean `{c}`?)"))
                    .unwrap_or_default();
                return Err(Error::config(
                    path,
                    format!("unknown pass `{name}`{hint}; valid passes: {}", known.join(", ")),
                ));
            }
        }
        Ok(())
    }
}

/// Adds "did you mean" to serde's unknown-field message, which already lists the valid keys.
fn explain_yaml_error(message: &str) -> String {
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message.to_string();
    };
    let Some((field, rest)) = rest.split_once('`') else {
        return message.to_string();
    };
    let expected: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
    match closest(field, &expected) {
        Some(c) => format!("{message} (did you mean `{c}`?)"),
        None => message.to_string(),
    }
}

/// The candidate within edit distance 3 of `word` (and less than its length), if any.
pub fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, _)| *d <= 3 && *d < word.len())
        .min()
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        Config::parse(text, Path::new("q.yaml"))
    }

    #[test]
    fn unknown_key_names_the_closest_valid_one() {
        let err = parse("quantise: false\n").unwrap_err().to_string();
        assert!(err.contains("unknown field `quantise`"), "{err}");
        assert!(err.contains("did you mean `quantize`?"), "{err}");
    }

    #[test]
    fn unknown_pass_lists_valid_ones() {
        let err = parse("quantize: false\npasses: [eliminate_identities]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("did you mean `eliminate_identity`?"), "{err}");
    }

    #[test]
    fn quantize_must_be_false_for_now() {
        assert!(parse("").is_err());
        let c = parse("quantize: false").unwrap();
        assert!(c.passes.is_empty());
    }

    #[test]
    fn edit_distance_is_levenshtein() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }
}
