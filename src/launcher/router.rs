//! Picks the launcher of each step: the message's `dagster_launcher` label (op tag
//! `dagster-taskiq/launcher`) when set, else the controller's default.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;

use super::{LaunchError, Launcher, RunningStep};
use crate::envelope::{LauncherKind, StepRequest};

pub struct LauncherRouter {
    default: LauncherKind,
    launchers: BTreeMap<LauncherKindKey, Arc<dyn Launcher>>,
}

/// `LauncherKind` is not `Ord`; its name is.
type LauncherKindKey = &'static str;

fn key(kind: LauncherKind) -> LauncherKindKey {
    match kind {
        LauncherKind::Process => "process",
        LauncherKind::Ecs => "ecs",
    }
}

impl LauncherRouter {
    /// A router whose steps without a launcher label go to `default`, which must be among
    /// `launchers`.
    pub fn new(
        default: LauncherKind,
        launchers: impl IntoIterator<Item = Arc<dyn Launcher>>,
    ) -> Result<Self, String> {
        let launchers: BTreeMap<_, _> = launchers
            .into_iter()
            .map(|launcher| (key(launcher.kind()), launcher))
            .collect();
        if !launchers.contains_key(key(default)) {
            return Err(format!(
                "the default launcher {} is not configured",
                key(default)
            ));
        }
        Ok(Self { default, launchers })
    }

    /// The kinds this router can launch.
    pub(crate) fn kinds(&self) -> Vec<&'static str> {
        self.launchers.keys().copied().collect()
    }
}

#[async_trait]
impl Launcher for LauncherRouter {
    fn kind(&self) -> LauncherKind {
        self.default
    }

    fn kind_for(&self, step: &StepRequest) -> LauncherKind {
        step.launcher.unwrap_or(self.default)
    }

    async fn has_execution_to_adopt(&self, step: &StepRequest) -> bool {
        match self.launchers.get(key(self.kind_for(step))) {
            Some(launcher) => launcher.has_execution_to_adopt(step).await,
            None => false,
        }
    }

    async fn launch(&self, step: &StepRequest) -> Result<Box<dyn RunningStep>, LaunchError> {
        let kind = self.kind_for(step);
        match self.launchers.get(key(kind)) {
            Some(launcher) => launcher.launch(step).await,
            None => Err(LaunchError::Invalid {
                reason: "launcher_unavailable",
                detail: format!(
                    "the step asks for the {} launcher (op tag dagster-taskiq/launcher), which \
                     this controller does not run (configured: {})",
                    key(kind),
                    self.kinds().join(", ")
                ),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fakes::{step_body, FakeBridge, FakeLauncher};

    #[tokio::test]
    async fn routes_by_label_and_refuses_unconfigured_kinds() {
        let fake = FakeLauncher::new(FakeBridge::default(), std::time::Duration::ZERO);
        let router =
            LauncherRouter::new(LauncherKind::Process, [Arc::new(fake.clone()) as _]).unwrap();
        let mut step = crate::envelope::decode(&step_body("t1", "run-1", "op_a", 0)).unwrap();
        assert_eq!(router.kind_for(&step), LauncherKind::Process);
        router.launch(&step).await.unwrap();
        assert_eq!(fake.launches().len(), 1);

        step.launcher = Some(LauncherKind::Ecs);
        assert_eq!(router.kind_for(&step), LauncherKind::Ecs);
        match router.launch(&step).await {
            Err(LaunchError::Invalid { reason, detail }) => {
                assert_eq!(reason, "launcher_unavailable");
                assert!(detail.contains("ecs"), "{detail}");
            }
            Err(other) => panic!("unexpected error {other}"),
            Ok(_) => panic!("launched without an ECS launcher"),
        }
        assert!(LauncherRouter::new(LauncherKind::Ecs, [Arc::new(fake) as _]).is_err());
    }
}
