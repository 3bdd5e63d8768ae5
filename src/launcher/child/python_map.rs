//! Which Python environment runs a local step: the interpreter mapped to its run's code
//! location (`--python-for LOCATION=PATH`), else `--python`, or a refusal when
//! `--python-for-unmapped refuse` leaves no default. The location is the one Dagster stored
//! with the run (`remote_job_origin`), read by the bridge: a queue message never chooses the
//! interpreter (docs/security.md).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::flags::{invalid, ConfigError};
use crate::launcher::LaunchError;

/// Dead-letter reason of a step whose code location has no environment here.
pub(crate) const UNMAPPED_LOCATION: &str = "unmapped_location";

/// What runs a step whose code location is not mapped (or whose run has none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Unmapped {
    /// `--python` runs it.
    Default,
    /// It is refused: a verdict naming the location, then the DLQ (`unmapped_location`).
    Refuse,
}

/// The code-location flags.
#[derive(Debug, Clone, clap::Args)]
pub struct PythonMapArgs {
    /// Python interpreter (absolute path) whose environment runs the process steps of runs
    /// from code location LOCATION; repeatable (env: comma-separated). Other locations run
    /// on --python, see --python-for-unmapped.
    #[arg(
        long = "python-for",
        env = "DAGSTER_TASKIQ_PYTHON_FOR",
        value_name = "LOCATION=PATH",
        value_delimiter = ','
    )]
    pub python_for: Vec<String>,

    /// What runs a process step whose run's code location has no --python-for (or whose run
    /// has no code location): `default` (--python) or `refuse` (a verdict, then the DLQ with
    /// reason unmapped_location).
    #[arg(long, env = "DAGSTER_TASKIQ_PYTHON_FOR_UNMAPPED", value_enum, default_value_t = Unmapped::Default)]
    pub python_for_unmapped: Unmapped,
}

impl PythonMapArgs {
    /// The map over `default` (`--python`); the error names the flag.
    pub fn map(&self, default: &Path) -> Result<PythonMap, ConfigError> {
        let mut locations = BTreeMap::new();
        for entry in &self.python_for {
            let Some((name, path)) = entry.split_once('=') else {
                return Err(invalid(
                    "python-for",
                    format!("{entry:?} is not LOCATION=PATH"),
                ));
            };
            let (name, path) = (name.trim(), PathBuf::from(path.trim()));
            if name.is_empty() {
                return Err(invalid(
                    "python-for",
                    format!("{entry:?} names no code location"),
                ));
            }
            if !path.is_absolute() {
                return Err(invalid(
                    "python-for",
                    format!(
                        "{}: the interpreter of location {name:?} must be an absolute path",
                        path.display()
                    ),
                ));
            }
            if locations.insert(name.to_owned(), path).is_some() {
                return Err(invalid(
                    "python-for",
                    format!("code location {name:?} is mapped twice"),
                ));
            }
        }
        if self.python_for_unmapped == Unmapped::Refuse && locations.is_empty() {
            return Err(invalid(
                "python-for-unmapped",
                "refuse without any --python-for would refuse every process step",
            ));
        }
        Ok(PythonMap {
            default: default.to_owned(),
            locations,
            unmapped: self.python_for_unmapped,
        })
    }
}

/// Code location → interpreter, with the default for the rest.
#[derive(Debug, Clone)]
pub struct PythonMap {
    default: PathBuf,
    locations: BTreeMap<String, PathBuf>,
    unmapped: Unmapped,
}

impl PythonMap {
    /// Every step on `python`, whatever its location.
    pub fn single(python: PathBuf) -> Self {
        Self {
            default: python,
            locations: BTreeMap::new(),
            unmapped: Unmapped::Default,
        }
    }

    /// `--python`.
    pub(crate) fn default_python(&self) -> &Path {
        &self.default
    }

    /// True when a step of an unmapped location (or of a run without one) runs on
    /// `--python`.
    pub(crate) fn runs_unmapped(&self) -> bool {
        self.unmapped == Unmapped::Default
    }

    /// The mapped (location, interpreter) pairs.
    pub fn locations(&self) -> impl Iterator<Item = (&str, &Path)> {
        self.locations
            .iter()
            .map(|(name, path)| (name.as_str(), path.as_path()))
    }

    /// Every interpreter a step may run on (the default one even when unmapped locations are
    /// refused: the bridge runs there).
    pub(crate) fn interpreters(&self) -> BTreeSet<&Path> {
        std::iter::once(self.default.as_path())
            .chain(self.locations.values().map(PathBuf::as_path))
            .collect()
    }

    /// The interpreter of a step of a run from `location` (`None`: the run has none).
    pub(crate) fn choose(&self, location: Option<&str>) -> Result<&Path, LaunchError> {
        if let Some(python) = location.and_then(|name| self.locations.get(name)) {
            return Ok(python);
        }
        match self.unmapped {
            Unmapped::Default => Ok(&self.default),
            Unmapped::Refuse => Err(LaunchError::Invalid {
                reason: UNMAPPED_LOCATION,
                detail: match location {
                    Some(name) => format!(
                        "the run's code location {name:?} has no Python environment on this \
                         controller (--python-for), and --python-for-unmapped is refuse"
                    ),
                    None => "the run has no code location (launched without a workspace), \
                             and --python-for-unmapped refuse leaves no default Python \
                             environment"
                        .to_owned(),
                },
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(entries: &[&str], unmapped: Unmapped) -> PythonMapArgs {
        PythonMapArgs {
            python_for: entries.iter().map(|e| e.to_string()).collect(),
            python_for_unmapped: unmapped,
        }
    }

    fn map(entries: &[&str], unmapped: Unmapped) -> PythonMap {
        args(entries, unmapped)
            .map(Path::new("python3"))
            .expect("a valid map")
    }

    fn refusal(map: &PythonMap, location: Option<&str>) -> String {
        match map.choose(location) {
            Err(LaunchError::Invalid { reason, detail }) => {
                assert_eq!(reason, UNMAPPED_LOCATION);
                detail
            }
            other => panic!("{location:?} was not refused: {other:?}"),
        }
    }

    #[test]
    fn a_mapped_location_runs_on_its_interpreter_the_rest_on_the_default() {
        let map = map(
            &["etl=/venvs/etl/bin/python", " ml = /venvs/ml/bin/python "],
            Unmapped::Default,
        );
        let chosen = |location| map.choose(location).unwrap().to_owned();
        assert_eq!(chosen(Some("etl")), Path::new("/venvs/etl/bin/python"));
        assert_eq!(chosen(Some("ml")), Path::new("/venvs/ml/bin/python"));
        assert_eq!(chosen(Some("other")), Path::new("python3"));
        assert_eq!(chosen(None), Path::new("python3"));
        // Names are exact: no case folding, no prefixes.
        assert_eq!(chosen(Some("ETL")), Path::new("python3"));
        assert_eq!(map.interpreters().len(), 3);
    }

    #[test]
    fn refuse_mode_refuses_an_unmapped_location_by_name_and_a_run_without_one() {
        let map = map(&["etl=/venvs/etl/bin/python"], Unmapped::Refuse);
        assert_eq!(
            map.choose(Some("etl")).unwrap(),
            Path::new("/venvs/etl/bin/python")
        );
        let why = refusal(&map, Some("finance"));
        assert!(why.contains("\"finance\""), "{why}");
        assert!(why.contains("--python-for-unmapped"), "{why}");
        let why = refusal(&map, None);
        assert!(why.contains("no code location"), "{why}");
    }

    #[test]
    fn bad_entries_are_refused_naming_the_flag() {
        for (entries, unmapped, flag, says) in [
            (
                &["etl"][..],
                Unmapped::Default,
                "--python-for:",
                "LOCATION=PATH",
            ),
            (
                &["=/bin/python"],
                Unmapped::Default,
                "--python-for:",
                "names no code location",
            ),
            (
                &["etl=python3"],
                Unmapped::Default,
                "--python-for:",
                "absolute path",
            ),
            (
                &["etl=/a/python", "etl=/b/python"],
                Unmapped::Default,
                "--python-for:",
                "mapped twice",
            ),
            (
                &[],
                Unmapped::Refuse,
                "--python-for-unmapped:",
                "every process step",
            ),
        ] {
            let err = args(entries, unmapped)
                .map(Path::new("python3"))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(flag), "{entries:?}: {err}");
            assert!(err.contains(says), "{entries:?}: {err}");
        }
    }

    #[test]
    fn the_flags_parse_from_the_command_line_and_the_environment_form() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            map: PythonMapArgs,
        }
        let cli = Cli::try_parse_from([
            "x",
            "--python-for",
            "etl=/a/python,ml=/b/python",
            "--python-for",
            "bi=/c/python",
            "--python-for-unmapped",
            "refuse",
        ])
        .unwrap();
        assert_eq!(cli.map.python_for.len(), 3);
        assert_eq!(cli.map.python_for_unmapped, Unmapped::Refuse);
        assert!(Cli::try_parse_from(["x", "--python-for-unmapped", "maybe"]).is_err());
    }
}
