//! The config file: TOML, a `[tables]` table for the datapath's table sizes, and one
//! `[[listener]]` table per listener with `[[listener.backend]]` tables. Read at daemon start
//! and on reload (inside the change transaction); every change is written back atomically
//! before it is applied, into the file's own text (comments and layout kept, see
//! [`crate::control::edit`]) (temp file in the target's directory, fsync, rename, fsync of the
//! directory), through symlinks to their target, leaving no temp file behind on failure.
//!
//! ```toml
//! [tables]
//! connections = 1048576
//!
//! [[listener]]
//! name = "web"
//! vip = "10.0.0.100:80"
//! proto = "tcp"
//! persist = 600          # seconds, 0 = off
//!
//! [[listener.backend]]
//! addr = "10.0.10.2:8080"
//! weight = 10
//! ```

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::control::model::{BgpSpec, ConfigError, ListenerSpec, TablesSpec, validate_all};

/// The file's contents.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default, skip_serializing_if = "is_default")]
    pub tables: TablesSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<BgpSpec>,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerSpec>,
}

fn is_default(t: &TablesSpec) -> bool {
    *t == TablesSpec::default()
}

/// A config file that cannot be used: missing, unreadable, not TOML of the right shape (the
/// message has the line and column), or invalid (the message names the field and range).
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error(
        "config file {path} does not exist (create it, empty for no listeners, or pass --init-config)"
    )]
    Missing { path: PathBuf },
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
        source: ConfigError,
    },
}

/// Writing the file failed; the file is as it was.
#[derive(Debug, thiserror::Error)]
#[error("writing the config file {path}: {what}: {source}")]
pub struct SaveError {
    pub path: PathBuf,
    pub what: &'static str,
    #[source]
    pub source: std::io::Error,
}

/// Why TOML text is not a usable configuration.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("{0}")]
    Toml(String),
    #[error(transparent)]
    Invalid(ConfigError),
}

impl ConfigFile {
    /// Reads and validates `path`. A missing file is an error ([`ConfigFileError::Missing`]).
    pub fn load(path: &Path) -> Result<Self, ConfigFileError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ConfigFileError::Missing { path: path.into() });
            }
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
        let cfg: ConfigFile = toml::from_str(text)
            .map_err(|e| ParseError::Toml(e.to_string().trim().replace('\n', " ")))?;
        cfg.validate().map_err(ParseError::Invalid)?;
        Ok(cfg)
    }

    /// Checks the whole configuration.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.tables.validate()?;
        if let Some(b) = &self.bgp {
            b.validate()?;
        }
        validate_all(&self.listeners)
    }

    /// The canonical TOML of this configuration, without the header comment.
    pub fn body(&self) -> String {
        // Serializing plain data to TOML cannot fail: every value is a table, array, string or
        // integer, and tables come after values by construction.
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# {e}\n"))
    }

    /// The TOML text of this configuration in its canonical form (a new file).
    pub fn to_toml(&self) -> String {
        format!(
            "# clb configuration. Written by the clb daemon after every change made through\n\
             # its API (your comments and layout are kept); edit it by hand and run\n\
             # `clb reload`, or use the CLI.\n\n{}",
            self.body()
        )
    }

    /// The text to write over a file holding `old`: `old` edited to say this configuration
    /// (comments, order and formatting of what did not change kept; see
    /// [`crate::control::edit`]), or the canonical form for a new or blank file, or when `old`
    /// cannot be edited (then a warning says so).
    pub fn text_over(&self, old: Option<&str>) -> String {
        let Some(old) = old.filter(|o| !o.trim().is_empty()) else {
            return self.to_toml();
        };
        let only_comments = old
            .parse::<toml_edit::DocumentMut>()
            .is_ok_and(|d| d.as_table().is_empty());
        if only_comments {
            // A file of comments alone: keep them on top.
            return format!("{}\n\n{}", old.trim_end(), self.body());
        }
        crate::control::edit::edit(old, self).unwrap_or_else(|| {
            tracing::warn!(
                "the config file's text could not be edited in place (not TOML, or spelled in a \
                 way the editor does not follow): writing it in canonical form, without its \
                 comments"
            );
            self.to_toml()
        })
    }

    /// Writes `self` to `path` atomically (see the module docs), merged into the file's own
    /// text. When `path` is a symlink its final target is replaced and the link stays. On
    /// failure the file is unchanged and no temp file is left. Returns the text it replaced
    /// (None when there was no file), which [`write_text`] puts back byte for byte.
    pub fn save(&self, path: &Path) -> Result<Option<String>, SaveError> {
        let old = resolve(path)
            .ok()
            .and_then(|t| std::fs::read_to_string(t).ok());
        write_text(path, &self.text_over(old.as_deref()))?;
        Ok(old)
    }
}

/// Writes `text` to `path` atomically: a temp file in the same directory, synced, renamed over
/// the target (a symlink's final target; the link stays), the directory synced. The file keeps
/// its mode. On failure the file is unchanged and no temp file is left.
pub fn write_text(path: &Path, text: &str) -> Result<(), SaveError> {
    let err = |what: &'static str| {
        move |source| SaveError {
            path: path.to_owned(),
            what,
            source,
        }
    };
    let target = resolve(path).map_err(err("resolving the path"))?;
    let dir = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_owned();
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "clb.toml".into());
    let mode = std::fs::metadata(&target)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644);
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let guard = TempGuard(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err("creating the temp file"))?;
    f.write_all(text.as_bytes())
        .map_err(err("writing the temp file"))?;
    f.sync_all().map_err(err("syncing the temp file"))?;
    drop(f);
    std::fs::rename(&tmp, &target).map_err(err("renaming the temp file over it"))?;
    std::mem::forget(guard);
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(err("syncing its directory"))?;
    Ok(())
}

/// Removes a temp file unless defused with `mem::forget`.
struct TempGuard<'a>(&'a Path);

impl Drop for TempGuard<'_> {
    fn drop(&mut self) {
        std::fs::remove_file(self.0).ok();
    }
}

/// The file `path` names after following symlinks (it may not exist yet: then its directory is
/// resolved and the name kept).
fn resolve(path: &Path) -> std::io::Result<PathBuf> {
    let mut p = path.to_owned();
    for _ in 0..40 {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let link = std::fs::read_link(&p)?;
                p = match p.parent() {
                    Some(parent) if link.is_relative() => parent.join(link),
                    _ => link,
                };
            }
            Ok(_) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(p),
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("too many levels of symbolic links"))
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

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("clb-cfg-{tag}-{}", std::process::id()));
        std::fs::remove_dir_all(&d).ok();
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn parses_and_round_trips() {
        let c = ConfigFile::parse(SAMPLE).unwrap();
        assert_eq!(c.listeners[0].persist, 600);
        assert_eq!(c.listeners[0].backends[0].weight, 10);
        assert_eq!(c.listeners[0].backends[1].weight, 0);
        let again = ConfigFile::parse(&c.to_toml()).unwrap();
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
        let e =
            ConfigFile::parse(&SAMPLE.replace("persist = 600", "cookie_name = \"a\"")).unwrap_err();
        assert!(
            e.to_string().contains("cookie_name does not apply to tcp"),
            "{e}"
        );
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    #[test]
    fn save_is_atomic_and_leaves_no_temp_files() {
        let dir = tempdir("save");
        let p = dir.join("clb.toml");
        let c = ConfigFile::parse(SAMPLE).unwrap();
        c.save(&p).unwrap();
        assert_eq!(ConfigFile::load(&p).unwrap(), c);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn save_through_a_symlink_updates_its_target() {
        let dir = tempdir("link");
        std::fs::create_dir_all(dir.join("real")).unwrap();
        let target = dir.join("real/clb.toml");
        std::fs::write(&target, "").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o640)).unwrap();
        let link = dir.join("clb.toml");
        std::os::unix::fs::symlink("real/clb.toml", &link).unwrap();
        let c = ConfigFile::parse(SAMPLE).unwrap();
        c.save(&link).unwrap();
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(ConfigFile::load(&target).unwrap(), c);
        assert_eq!(
            std::fs::metadata(&target).unwrap().permissions().mode() & 0o777,
            0o640,
            "the file keeps its mode"
        );
        assert_eq!(std::fs::read_dir(dir.join("real")).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_save_leaves_the_file_and_no_temp() {
        let dir = tempdir("fail");
        // The target is a directory: the rename over it fails.
        let p = dir.join("clb.toml");
        std::fs::create_dir_all(p.join("x")).unwrap();
        let e = ConfigFile::default().save(&p).unwrap_err();
        assert!(e.to_string().contains("renaming"), "{e}");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "only the original: {names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_file_is_an_error() {
        let e = ConfigFile::load(Path::new("/nonexistent/clb.toml")).unwrap_err();
        assert!(matches!(e, ConfigFileError::Missing { .. }));
    }
}
