//! Secrets in configuration: given inline (discouraged), by an environment variable, or by a
//! file; at most one way. Values never appear in logs, errors or `Debug` output: errors name
//! where a secret was looked for, never what it is.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A secret value; `Debug` prints `***`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    /// The value, for the one place that needs it (a connection, a handshake).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// The three ways a secret can be configured, under `{name}`, `{name}_env` and `{name}_file`.
#[derive(Debug, Clone, Copy)]
pub struct SecretSource<'a> {
    pub name: &'a str,
    pub inline: Option<&'a Secret>,
    pub env: Option<&'a str>,
    pub file: Option<&'a Path>,
}

impl SecretSource<'_> {
    /// At most one way is set; `required`: exactly one.
    pub fn validate(&self, required: bool) -> Result<(), (String, String)> {
        let name = self.name;
        match [self.inline.is_some(), self.env.is_some(), self.file.is_some()].into_iter().filter(|s| *s).count() {
            0 if required => Err((format!("{name}_file"), format!("set {name}_file, {name}_env or {name}"))),
            0 | 1 => Ok(()),
            _ => Err((name.to_owned(), format!("set one of {name}_file, {name}_env and {name}"))),
        }
    }

    /// The value, if one is configured; errors name the variable or file, never the value.
    pub fn load(&self) -> anyhow::Result<Option<Secret>> {
        use anyhow::Context as _;
        let name = self.name;
        if let Some(s) = self.inline {
            return Ok(Some(s.clone()));
        }
        if let Some(path) = self.file {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading {name}_file {}", path.display()))?;
            anyhow::ensure!(!text.trim().is_empty(), "{name}_file {} is empty", path.display());
            return Ok(Some(Secret(text.trim_end_matches(['\n', '\r']).to_owned())));
        }
        if let Some(var) = self.env {
            let value = std::env::var(var).with_context(|| format!("environment variable {var} ({name}_env)"))?;
            anyhow::ensure!(!value.is_empty(), "environment variable {var} ({name}_env) is empty");
            return Ok(Some(Secret(value)));
        }
        Ok(None)
    }
}

/// Makes a relative secret file relative to `base`.
pub fn resolve(file: &mut Option<PathBuf>, base: &Path) {
    if let Some(p) = file
        && p.is_relative()
    {
        *p = base.join(&*p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_load_from_one_place_and_never_show() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let from_file = SecretSource { name: "password", inline: None, env: None, file: Some(&file) };
        let secret = from_file.load().unwrap().unwrap();
        assert_eq!(secret.expose(), "s3cret");
        assert_eq!(format!("{secret:?}"), "***");

        let missing =
            SecretSource { name: "password", inline: None, env: Some("ACTIDASH_TEST_NO_SUCH_VAR"), file: None };
        let err = format!("{:#}", missing.load().unwrap_err());
        assert!(err.contains("ACTIDASH_TEST_NO_SUCH_VAR") && err.contains("password_env"), "{err}");

        let inline = Secret::new("x".into());
        let both = SecretSource { name: "password", inline: Some(&inline), env: None, file: Some(&file) };
        assert_eq!(both.validate(false).unwrap_err().0, "password");
        let none = SecretSource { name: "password", inline: None, env: None, file: None };
        assert!(none.validate(false).is_ok());
        assert_eq!(none.validate(true).unwrap_err().0, "password_file");
        assert!(none.load().unwrap().is_none());
    }
}
