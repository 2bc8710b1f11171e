//! The config file: TOML, one `[[listener]]` table per listener with `[[listener.backend]]`
//! tables. Read at daemon start and on reload; every change made through the API is written
//! back atomically (temp file, fsync, rename, fsync of the directory), so the next start comes
//! back to the same state.
//!
//! ```toml
//! [[listener]]
//! name = "web"
//! vip = "10.0.0.100:80"
//! proto = "tcp"
//! persist = 600          # seconds, 0 = off
//! idle_timeout = 900     # seconds
//!
//! [[listener.backend]]
//! addr = "10.0.10.2:8080"
//! weight = 10
//! ```

use std::{
    fs::File,
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::model::{ListenerSpec, validate_all};

/// The file's contents.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerSpec>,
}

/// A config file that cannot be used: unreadable, not TOML of the right shape (the message
/// has the line and column), or invalid (the message names the field and allowed range).
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Invalid {
        path: PathBuf,
        #[source]
        source: crate::model::ConfigError,
    },
}

impl ConfigFile {
    /// Reads and validates `path`. A missing file is an empty configuration.
    pub fn load(path: &Path) -> Result<Self, ConfigFileError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(ConfigFileError::Read {
                    path: path.into(),
                    source,
                });
            }
        };
        Self::parse(&text).map_err(|e| match e {
            ParseError::Toml(message) => ConfigFileError::Parse {
                path: path.into(),
                message,
            },
            ParseError::Invalid(source) => ConfigFileError::Invalid {
                path: path.into(),
                source,
            },
        })
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let cfg: ConfigFile =
            toml::from_str(text).map_err(|e| ParseError::Toml(e.to_string().trim().to_owned()))?;
        validate_all(&cfg.listeners).map_err(ParseError::Invalid)?;
        Ok(cfg)
    }

    /// The TOML text of this configuration.
    pub fn to_toml(&self) -> anyhow::Result<String> {
        let body = toml::to_string_pretty(self).context("serializing the configuration")?;
        Ok(format!(
            "# clb configuration. Written by the clb daemon after every change made through\n\
             # its API; edit it by hand and run `clb reload`, or use the CLI.\n\n{body}"
        ))
    }

    /// Writes `self` to `path` atomically: a temp file in the same directory, fsync, rename,
    /// fsync of the directory. Readers see the old or the new file, never a mix.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let staged = self.stage(path)?;
        staged.commit()
    }

    /// First half of [`ConfigFile::save`]: the new contents are durable in a temp file, the
    /// old file untouched. [`Staged::commit`] renames it into place; dropping discards it.
    pub fn stage(&self, path: &Path) -> anyhow::Result<Staged> {
        let text = self.to_toml()?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let name = path
            .file_name()
            .context("config path has no file name")?
            .to_string_lossy();
        let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
        let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()
            .with_context(|| format!("fsync {}", tmp.display()))?;
        Ok(Staged {
            tmp,
            path: path.to_owned(),
            dir: dir.to_owned(),
            done: false,
        })
    }
}

/// A configuration written to a temp file, not yet renamed into place.
pub struct Staged {
    tmp: PathBuf,
    path: PathBuf,
    dir: PathBuf,
    done: bool,
}

impl Staged {
    /// Renames the temp file over the config file and makes the rename durable.
    pub fn commit(mut self) -> anyhow::Result<()> {
        std::fs::rename(&self.tmp, &self.path).with_context(|| {
            format!("renaming {} to {}", self.tmp.display(), self.path.display())
        })?;
        self.done = true;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("fsync {}", self.dir.display()))?;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.done {
            std::fs::remove_file(&self.tmp).ok();
        }
    }
}

/// Why TOML text is not a usable configuration.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("{0}")]
    Toml(String),
    #[error(transparent)]
    Invalid(crate::model::ConfigError),
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
[[listener]]
name = "web"
vip = "10.0.0.100:80"
proto = "tcp"
persist = 600

[[listener.backend]]
addr = "10.0.10.2:8080"

[[listener.backend]]
addr = "10.0.11.2:8080"
weight = 0
"#;

    #[test]
    fn parses_and_round_trips() {
        let c = ConfigFile::parse(SAMPLE).unwrap();
        assert_eq!(c.listeners[0].persist, 600);
        assert_eq!(c.listeners[0].backends[0].weight, 10);
        assert_eq!(c.listeners[0].backends[1].weight, 0);
        let again = ConfigFile::parse(&c.to_toml().unwrap()).unwrap();
        assert_eq!(c, again);
    }

    #[test]
    fn errors_carry_line_or_field() {
        let e = ConfigFile::parse("[[listener]]\nname = \"x\"\nvip = 5\n").unwrap_err();
        assert!(e.to_string().contains("line 3"), "{e}");
        let e = ConfigFile::parse(&SAMPLE.replace("persist = 600", "persist = 7200")).unwrap_err();
        assert!(
            e.to_string().contains("persist 7200 is out of range"),
            "{e}"
        );
        let e = ConfigFile::parse(&SAMPLE.replace("persist = 600", "persistence = 6")).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }

    #[test]
    fn save_is_atomic_and_leaves_no_temp_files() {
        let dir = std::env::temp_dir().join(format!("clb-cfg-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("clb.toml");
        let c = ConfigFile::parse(SAMPLE).unwrap();
        c.save(&p).unwrap();
        assert_eq!(ConfigFile::load(&p).unwrap(), c);
        {
            let _discarded = ConfigFile::default().stage(&p).unwrap();
        }
        assert_eq!(
            ConfigFile::load(&p).unwrap(),
            c,
            "a dropped stage changes nothing"
        );
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
