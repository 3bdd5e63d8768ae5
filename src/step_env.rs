//! The environment of the processes the controller starts on its own host: process steps, the
//! warm zygote (whose forks inherit it) and the Dagster bridge. It is the controller's own
//! environment minus the controller's configuration and secrets (every `DAGSTER_TASKIQ_*`
//! variable, the admin token among them) and whatever `--step-env-deny` names, or, with
//! `--step-env-allow`, only what that list (and [`ALWAYS_KEPT`]) names; plus the variables of
//! `--step-env-file` and `--step-env`. Built once at startup (docs/security.md, "Step
//! environments").

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use crate::flags::{invalid, ConfigError};

/// The controller's own variables: configuration and secrets, never passed on.
pub(crate) const CONTROLLER_PREFIX: &str = "DAGSTER_TASKIQ_";

/// What allow-list mode keeps whatever the list says: what a Python step needs to start, find
/// its code and its Dagster instance.
pub const ALWAYS_KEPT: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_*",
    "TZ",
    "TMPDIR",
    "DAGSTER_HOME",
    "PYTHON*",
    "VIRTUAL_ENV",
];

/// Where Dagster finds its instance's `dagster.yaml`.
pub(crate) const DAGSTER_HOME: &str = "DAGSTER_HOME";

/// Set per step by the launchers; an addition of one of these would be overwritten.
pub(crate) const PER_STEP: &[&str] = &[
    "DAGSTER_COMPRESSED_EXECUTE_STEP_ARGS",
    "DAGSTER_RUN_JOB_NAME",
    "DAGSTER_RUN_STEP_KEY",
];

/// The step environment's flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct StepEnvArgs {
    /// Variable steps (and the bridge) do not inherit from the controller: a name, or a prefix
    /// ending in `*` (`AWS_SECRET_*`); repeatable (env: comma-separated). Every
    /// DAGSTER_TASKIQ_* variable is removed anyway.
    #[arg(
        long = "step-env-deny",
        env = "DAGSTER_TASKIQ_STEP_ENV_DENY",
        value_name = "NAME",
        value_delimiter = ','
    )]
    pub step_env_deny: Vec<NamePattern>,

    /// Allow-list mode: steps inherit only these variables (a name, or a prefix ending in
    /// `*`) and PATH, HOME, USER, LOGNAME, LANG, LC_*, TZ, TMPDIR, DAGSTER_HOME, PYTHON*,
    /// VIRTUAL_ENV; repeatable (env: comma-separated). --step-env-deny still applies.
    #[arg(
        long = "step-env-allow",
        env = "DAGSTER_TASKIQ_STEP_ENV_ALLOW",
        value_name = "NAME",
        value_delimiter = ','
    )]
    pub step_env_allow: Vec<NamePattern>,

    /// Variable set in every step, `KEY=VALUE`, over the inherited ones and the file's;
    /// repeatable (env: one KEY=VALUE).
    #[arg(
        long = "step-env",
        env = "DAGSTER_TASKIQ_STEP_ENV",
        value_name = "KEY=VALUE"
    )]
    pub step_env: Vec<EnvPair>,

    /// File of `KEY=VALUE` lines (blank lines and `#` comments ignored, a value may be quoted)
    /// set in every step.
    #[arg(long, env = "DAGSTER_TASKIQ_STEP_ENV_FILE", value_name = "PATH")]
    pub step_env_file: Option<PathBuf>,

    /// The controller's Dagster instance: the directory of its `dagster.yaml`, the same as the
    /// deployment's. The bridge and every process step use it, whatever a message names;
    /// without the flag, the controller's DAGSTER_HOME.
    #[arg(long, env = "DAGSTER_TASKIQ_DAGSTER_HOME", value_name = "DIR")]
    pub dagster_home: Option<PathBuf>,
}

impl StepEnvArgs {
    /// The policy the flags describe; reads `--step-env-file`. The error names the flag.
    pub fn policy(&self) -> Result<StepEnvPolicy, ConfigError> {
        let mut additions = Vec::new();
        if let Some(path) = &self.step_env_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                invalid(
                    "step-env-file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            additions.extend(
                parse_env_file(&text)
                    .map_err(|e| invalid("step-env-file", format!("{}:{e}", path.display())))?,
            );
        }
        additions.extend(self.step_env.iter().cloned());
        let added_home = additions.iter().any(|p| p.key == DAGSTER_HOME);
        match self.instance_home()? {
            Some(_) if added_home && self.dagster_home.is_some() => {
                return Err(invalid(
                    "dagster-home",
                    "DAGSTER_HOME is also set by --step-env or --step-env-file: give the instance once",
                ));
            }
            Some(home) if !added_home => additions.push(home),
            _ => {}
        }
        if let Some(reserved) = additions
            .iter()
            .find(|p| PER_STEP.contains(&p.key.as_str()))
        {
            let flag = if self.step_env.contains(reserved) {
                "step-env"
            } else {
                "step-env-file"
            };
            return Err(invalid(
                flag,
                format!("{} is set per step by the launcher", reserved.key),
            ));
        }
        Ok(StepEnvPolicy {
            deny: self.step_env_deny.clone(),
            allow: (!self.step_env_allow.is_empty()).then(|| self.step_env_allow.clone()),
            additions,
        })
    }

    /// `DAGSTER_HOME` of `--dagster-home`, made absolute (steps may start elsewhere): an
    /// existing directory, checked now rather than by the bridge's first request. Without the
    /// flag, a relative `DAGSTER_HOME` of the controller's environment is made absolute the
    /// same way (Dagster refuses a relative one).
    fn instance_home(&self) -> Result<Option<EnvPair>, ConfigError> {
        let (dir, whose) = match (&self.dagster_home, std::env::var_os(DAGSTER_HOME)) {
            (Some(dir), _) => (dir.clone(), ""),
            (None, Some(dir)) if Path::new(&dir).is_relative() => {
                (dir.into(), "the environment's DAGSTER_HOME ")
            }
            _ => return Ok(None),
        };
        let not = |what: &str| {
            invalid(
                "dagster-home",
                format!("{whose}{} is not {what}", dir.display()),
            )
        };
        let home = std::fs::canonicalize(&dir)
            .ok()
            .filter(|home| home.is_dir())
            .ok_or_else(|| not("a directory"))?;
        let value = home
            .into_os_string()
            .into_string()
            .map_err(|_| not("UTF-8"))?;
        Ok(Some(EnvPair {
            key: DAGSTER_HOME.to_owned(),
            value,
        }))
    }

    /// The environment steps get: the policy applied to this process's environment.
    pub fn environment(&self) -> Result<StepEnvironment, ConfigError> {
        Ok(StepEnvironment::from_process(&self.policy()?))
    }
}

/// A variable name (`AWS_PROFILE`) or a name prefix ending in `*` (`AWS_SECRET_*`).
#[derive(Clone, PartialEq, Eq)]
pub struct NamePattern {
    stem: String,
    prefix: bool,
}

impl NamePattern {
    pub fn matches(&self, name: &OsStr) -> bool {
        let name = name.as_bytes();
        if self.prefix {
            name.starts_with(self.stem.as_bytes())
        } else {
            name == self.stem.as_bytes()
        }
    }
}

impl FromStr for NamePattern {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (stem, prefix) = match text.strip_suffix('*') {
            Some(stem) => (stem, true),
            None => (text, false),
        };
        if (stem.is_empty() && !prefix)
            || stem.contains(['=', '*', '\0'])
            || stem.contains(char::is_whitespace)
        {
            return Err(format!(
                "{text:?} is not a variable name or a prefix ending in `*`"
            ));
        }
        Ok(Self {
            stem: stem.to_owned(),
            prefix,
        })
    }
}

impl fmt::Debug for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.stem, if self.prefix { "*" } else { "" })
    }
}

/// One `KEY=VALUE` addition. Debug shows the key only: values are often secrets.
#[derive(Clone, PartialEq, Eq)]
pub struct EnvPair {
    pub key: String,
    pub value: String,
}

impl FromStr for EnvPair {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let Some((key, value)) = text.split_once('=') else {
            return Err(format!("{:?} is not KEY=VALUE", redact(text)));
        };
        if !is_variable_name(key) {
            return Err(format!(
                "{key:?} is not a variable name (letters, digits and `_`, not starting with a digit)"
            ));
        }
        if value.contains('\0') {
            return Err(format!("the value of {key} contains a NUL byte"));
        }
        Ok(Self {
            key: key.to_owned(),
            value: value.to_owned(),
        })
    }
}

impl fmt::Debug for EnvPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}=…", self.key)
    }
}

/// The part of an unparsable `--step-env` value that is surely not a secret: its start.
fn redact(text: &str) -> String {
    let start: String = text.chars().take(12).collect();
    if start.len() < text.len() {
        format!("{start}…")
    } else {
        start
    }
}

fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses dotenv-style text: `KEY=VALUE` lines, optionally `export KEY=VALUE`; blank lines and
/// lines starting with `#` are skipped; a value wholly in matching single or double quotes
/// loses them (no escapes). The error starts with the 1-based line number.
pub fn parse_env_file(text: &str) -> Result<Vec<EnvPair>, String> {
    let mut pairs = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        let numbered = |e: String| format!("{}: {e}", index + 1);
        let Some((key, value)) = line.split_once('=') else {
            return Err(numbered(line.parse::<EnvPair>().unwrap_err()));
        };
        let value = value.trim();
        let value = [('"', '"'), ('\'', '\'')]
            .iter()
            .find_map(|(open, close)| value.strip_prefix(*open)?.strip_suffix(*close))
            .unwrap_or(value);
        let pair: EnvPair = format!("{}={value}", key.trim_end())
            .parse()
            .map_err(numbered)?;
        pairs.push(pair);
    }
    Ok(pairs)
}

/// Which inherited variables a step keeps, and the additions.
#[derive(Debug, Clone, Default)]
pub struct StepEnvPolicy {
    /// Removed even when allowed.
    pub deny: Vec<NamePattern>,
    /// `Some`: allow-list mode, only these (and [`ALWAYS_KEPT`]) are inherited.
    pub allow: Option<Vec<NamePattern>>,
    /// Set over the inherited variables; a later one wins.
    pub additions: Vec<EnvPair>,
}

impl StepEnvPolicy {
    /// True when a step inherits the controller's variable `name`.
    pub fn inherits(&self, name: &OsStr) -> bool {
        if name.as_bytes().starts_with(CONTROLLER_PREFIX.as_bytes()) {
            return false;
        }
        if self.deny.iter().any(|p| p.matches(name)) {
            return false;
        }
        match &self.allow {
            None => true,
            Some(allow) => {
                let name = name.as_bytes();
                let always = ALWAYS_KEPT.iter().any(|kept| match kept.strip_suffix('*') {
                    Some(prefix) => name.starts_with(prefix.as_bytes()),
                    None => name == kept.as_bytes(),
                });
                always || allow.iter().any(|p| p.matches(OsStr::from_bytes(name)))
            }
        }
    }
}

/// The complete environment of a step (before its per-step variables), computed once. Debug
/// shows names only.
#[derive(Clone)]
pub struct StepEnvironment {
    vars: Arc<BTreeMap<OsString, OsString>>,
    /// Inherited names the policy removed, for the startup log.
    removed: Arc<Vec<OsString>>,
}

impl StepEnvironment {
    /// Applies `policy` to the `inherited` environment.
    pub fn new(
        policy: &StepEnvPolicy,
        inherited: impl IntoIterator<Item = (OsString, OsString)>,
    ) -> Self {
        let mut vars = BTreeMap::new();
        let mut removed = Vec::new();
        for (name, value) in inherited {
            if policy.inherits(&name) {
                vars.insert(name, value);
            } else {
                removed.push(name);
            }
        }
        for pair in &policy.additions {
            vars.insert(pair.key.clone().into(), pair.value.clone().into());
        }
        removed.sort();
        Self {
            vars: Arc::new(vars),
            removed: Arc::new(removed),
        }
    }

    /// Applies `policy` to this process's environment.
    pub fn from_process(policy: &StepEnvPolicy) -> Self {
        Self::new(policy, std::env::vars_os())
    }

    /// This one plus the controller's own variable `name`, when it has it: the bridge reads
    /// its log level from one.
    pub(crate) fn with_inherited(&self, name: &str) -> Self {
        let Some(value) = std::env::var_os(name) else {
            return self.clone();
        };
        let mut vars = (*self.vars).clone();
        vars.insert(name.into(), value);
        Self {
            vars: Arc::new(vars),
            removed: self.removed.clone(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&OsStr> {
        self.vars.get(OsStr::new(name)).map(OsString::as_os_str)
    }

    pub fn names(&self) -> impl Iterator<Item = &OsStr> {
        self.vars.keys().map(OsString::as_os_str)
    }

    /// Inherited names the policy removed.
    pub fn removed(&self) -> &[OsString] {
        &self.removed
    }

    /// Makes `command` start with exactly this environment (per-step variables go on after).
    pub(crate) fn apply(&self, command: &mut tokio::process::Command) {
        command.env_clear().envs(self.vars.iter());
    }

    /// Logs what steps get: names only, never values.
    pub fn log_summary(&self) {
        tracing::info!(
            variables = self.vars.len(),
            removed = ?self.removed.iter().map(|n| n.to_string_lossy()).collect::<Vec<_>>(),
            "step environment: the controller's DAGSTER_TASKIQ_* variables and the denied ones are not passed on"
        );
    }
}

impl fmt::Debug for StepEnvironment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepEnvironment")
            .field("names", &self.vars.keys().collect::<Vec<_>>())
            .field("removed", &self.removed)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect()
    }

    fn patterns(texts: &[&str]) -> Vec<NamePattern> {
        texts.iter().map(|t| t.parse().unwrap()).collect()
    }

    fn names(e: &StepEnvironment) -> Vec<String> {
        e.names()
            .map(|n| n.to_string_lossy().into_owned())
            .collect()
    }

    const CONTROLLER: &[(&str, &str)] = &[
        ("PATH", "/usr/bin"),
        ("HOME", "/home/d"),
        ("DAGSTER_HOME", "/d"),
        ("PYTHONPATH", "/code"),
        ("LC_ALL", "C.UTF-8"),
        ("AWS_REGION", "eu-west-1"),
        ("AWS_SECRET_ACCESS_KEY", "s3cr3t"),
        ("AWS_SECRET_TOKEN", "t0k3n"),
        ("DB_PASSWORD", "hunter2"),
        ("DAGSTER_TASKIQ_ADMIN_TOKEN", "0123456789abcdef"),
        ("DAGSTER_TASKIQ_SQS_QUEUE_URL", "http://q"),
        ("DAGSTER_TASKIQ_", "edge"),
    ];

    #[test]
    fn every_controller_variable_is_removed_and_the_rest_kept() {
        let e = StepEnvironment::new(&StepEnvPolicy::default(), env(CONTROLLER));
        assert_eq!(
            names(&e),
            [
                "AWS_REGION",
                "AWS_SECRET_ACCESS_KEY",
                "AWS_SECRET_TOKEN",
                "DAGSTER_HOME",
                "DB_PASSWORD",
                "HOME",
                "LC_ALL",
                "PATH",
                "PYTHONPATH"
            ]
        );
        assert_eq!(
            e.removed(),
            [
                "DAGSTER_TASKIQ_",
                "DAGSTER_TASKIQ_ADMIN_TOKEN",
                "DAGSTER_TASKIQ_SQS_QUEUE_URL"
            ]
        );
        assert!(!format!("{e:?}").contains("s3cr3t"));
    }

    #[test]
    fn deny_takes_exact_names_and_prefixes() {
        let policy = StepEnvPolicy {
            deny: patterns(&["AWS_SECRET_*", "DB_PASSWORD", "HOM"]),
            ..Default::default()
        };
        let e = StepEnvironment::new(&policy, env(CONTROLLER));
        assert_eq!(
            names(&e),
            [
                "AWS_REGION",
                "DAGSTER_HOME",
                "HOME",
                "LC_ALL",
                "PATH",
                "PYTHONPATH"
            ]
        );
    }

    #[test]
    fn allow_mode_keeps_the_list_and_what_steps_need_but_deny_still_wins() {
        let policy = StepEnvPolicy {
            allow: Some(patterns(&["AWS_*", "DAGSTER_TASKIQ_SQS_QUEUE_URL"])),
            deny: patterns(&["AWS_SECRET_TOKEN", "PYTHONPATH"]),
            ..Default::default()
        };
        let e = StepEnvironment::new(&policy, env(CONTROLLER));
        // DAGSTER_TASKIQ_* goes even when allowed; PATH, HOME, DAGSTER_HOME, LC_* are kept.
        assert_eq!(
            names(&e),
            [
                "AWS_REGION",
                "AWS_SECRET_ACCESS_KEY",
                "DAGSTER_HOME",
                "HOME",
                "LC_ALL",
                "PATH"
            ]
        );
    }

    #[test]
    fn additions_go_over_inherited_and_denied_variables() {
        let policy = StepEnvPolicy {
            deny: patterns(&["DB_*"]),
            additions: vec![
                "DB_PASSWORD=for-steps".parse().unwrap(),
                "ADDED=1".parse().unwrap(),
                "ADDED=2".parse().unwrap(),
            ],
            ..Default::default()
        };
        let e = StepEnvironment::new(&policy, env(CONTROLLER));
        assert_eq!(e.get("DB_PASSWORD"), Some(OsStr::new("for-steps")));
        assert_eq!(e.get("ADDED"), Some(OsStr::new("2")));
        assert_eq!(e.get("DAGSTER_TASKIQ_ADMIN_TOKEN"), None);
    }

    #[test]
    fn patterns_and_pairs_reject_what_they_cannot_mean() {
        for bad in ["", "A*B", "*A", "A=B", "A B"] {
            assert!(bad.parse::<NamePattern>().is_err(), "{bad:?}");
        }
        assert!("*"
            .parse::<NamePattern>()
            .unwrap()
            .matches(OsStr::new("ANY")));
        for bad in ["NOEQUALS", "=v", "1A=v", "A-B=v", "A B=v"] {
            assert!(bad.parse::<EnvPair>().is_err(), "{bad:?}");
        }
        let pair: EnvPair = "URL=http://x/?a=b".parse().unwrap();
        assert_eq!(pair.value, "http://x/?a=b");
        assert_eq!(format!("{pair:?}"), "URL=…");
        let err = "a-very-long-secret-without-equals"
            .parse::<EnvPair>()
            .unwrap_err();
        assert!(!err.contains("secret-without"), "{err}");
    }

    #[test]
    fn env_files_are_dotenv_lines() {
        let text = "# the steps' settings\n\nA=1\nexport B = two words \nC=\"quoted # not a comment\"\nD='single'\nE=\n";
        let pairs = parse_env_file(text).unwrap();
        let got: Vec<(&str, &str)> = pairs
            .iter()
            .map(|p| (p.key.as_str(), p.value.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("A", "1"),
                ("B", "two words"),
                ("C", "quoted # not a comment"),
                ("D", "single"),
                ("E", "")
            ]
        );
        let err = parse_env_file("A=1\n\nnot a pair\n").unwrap_err();
        assert!(err.starts_with("3: "), "{err}");
    }

    #[test]
    fn a_bad_file_line_is_an_error_naming_the_flag_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("steps.env");
        std::fs::write(&path, "GOOD=1\n# fine\n2BAD=x\n").unwrap();
        let args = StepEnvArgs {
            step_env_file: Some(path.clone()),
            ..Default::default()
        };
        let err = args.policy().unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("--step-env-file: {}:3: ", path.display())),
            "{err}"
        );
        let missing = StepEnvArgs {
            step_env_file: Some(dir.path().join("absent.env")),
            ..Default::default()
        };
        let err = missing.policy().unwrap_err().to_string();
        assert!(err.starts_with("--step-env-file: cannot read"), "{err}");
    }

    #[test]
    fn the_flags_override_the_file_and_may_not_set_per_step_variables() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("steps.env");
        std::fs::write(&path, "A=file\nB=file\n").unwrap();
        let args = StepEnvArgs {
            step_env_file: Some(path.clone()),
            step_env: vec!["A=flag".parse().unwrap()],
            step_env_allow: patterns(&["X"]),
            ..Default::default()
        };
        let policy = args.policy().unwrap();
        assert!(policy.allow.is_some());
        let e = StepEnvironment::new(&policy, env(CONTROLLER));
        assert_eq!(e.get("A"), Some(OsStr::new("flag")));
        assert_eq!(e.get("B"), Some(OsStr::new("file")));

        let args = StepEnvArgs {
            step_env: vec!["DAGSTER_RUN_STEP_KEY=x".parse().unwrap()],
            ..Default::default()
        };
        let err = args.policy().unwrap_err().to_string();
        assert!(err.starts_with("--step-env: DAGSTER_RUN_STEP_KEY"), "{err}");
        std::fs::write(&path, "DAGSTER_RUN_JOB_NAME=x\n").unwrap();
        let args = StepEnvArgs {
            step_env_file: Some(path),
            ..Default::default()
        };
        let err = args.policy().unwrap_err().to_string();
        assert!(
            err.starts_with("--step-env-file: DAGSTER_RUN_JOB_NAME"),
            "{err}"
        );
    }

    #[test]
    fn dagster_home_pins_the_instance_of_every_step() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("instance");
        std::fs::create_dir(&home).unwrap();
        // A relative path is made absolute: steps and the bridge may start elsewhere.
        let relative = pathdiff(&home);
        let args = StepEnvArgs {
            dagster_home: Some(relative),
            ..Default::default()
        };
        let e = StepEnvironment::new(&args.policy().unwrap(), env(CONTROLLER));
        let expected = std::fs::canonicalize(&home).unwrap();
        assert_eq!(e.get("DAGSTER_HOME"), Some(expected.as_os_str()));

        // Allow-list mode keeps it too, and a deny of DAGSTER_HOME cannot drop the flag's.
        let args = StepEnvArgs {
            dagster_home: Some(home.clone()),
            step_env_allow: patterns(&["AWS_REGION"]),
            step_env_deny: patterns(&["DAGSTER_HOME"]),
            ..Default::default()
        };
        let e = StepEnvironment::new(&args.policy().unwrap(), env(CONTROLLER));
        assert_eq!(e.get("DAGSTER_HOME"), Some(expected.as_os_str()));

        let missing = StepEnvArgs {
            dagster_home: Some(dir.path().join("absent")),
            ..Default::default()
        };
        let err = missing.policy().unwrap_err().to_string();
        assert!(
            err.starts_with("--dagster-home:") && err.contains("not a directory"),
            "{err}"
        );

        let twice = StepEnvArgs {
            dagster_home: Some(home),
            step_env: vec!["DAGSTER_HOME=/elsewhere".parse().unwrap()],
            ..Default::default()
        };
        let err = twice.policy().unwrap_err().to_string();
        assert!(err.starts_with("--dagster-home:"), "{err}");
    }

    /// `path` relative to the current directory.
    fn pathdiff(path: &std::path::Path) -> PathBuf {
        let cwd = std::env::current_dir().unwrap();
        let ups = cwd.components().count() - 1;
        let mut relative: PathBuf = std::iter::repeat_n("..", ups).collect();
        relative.push(path.strip_prefix("/").unwrap());
        relative
    }
}
