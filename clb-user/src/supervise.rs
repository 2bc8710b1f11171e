//! Supervised background loops: each runs as its own task; a loop that fails (returns an
//! error or panics) is logged, recorded in the controller's loop registry (`clb status`
//! shows it) and restarted after a pause that grows to 10 s while it keeps failing. A loop
//! that returns `Ok` has finished its work and stays stopped.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::task::JoinHandle;
use tracing::error;

use crate::control::{Controller, status::LoopState};

/// Spawns loop `name`, made afresh by `make` at every (re)start.
pub fn spawn<F, Fut>(ctl: Arc<Controller>, name: &'static str, make: F) -> JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    tokio::spawn(async move {
        let mut pause = Duration::from_millis(100);
        loop {
            ctl.loops().set(name, LoopState::Running, None);
            let why = match tokio::spawn(make()).await {
                Ok(Ok(())) => {
                    ctl.loops().set(name, LoopState::Stopped, None);
                    return;
                }
                Ok(Err(e)) => format!("{e:#}"),
                Err(e) if e.is_panic() => {
                    let p = e.into_panic();
                    let msg = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                        .unwrap_or_else(|| "unknown panic".into());
                    format!("panicked: {msg}")
                }
                Err(_) => {
                    // Cancelled: the daemon is stopping.
                    ctl.loops().set(name, LoopState::Stopped, None);
                    return;
                }
            };
            error!(
                task = name,
                "background loop failed, restarting in {pause:?}: {why}"
            );
            ctl.loops().set(name, LoopState::Restarting, Some(why));
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(10));
        }
    })
}

#[cfg(test)]
mod tests {
    use std::{
        path::PathBuf,
        sync::atomic::{AtomicU32, Ordering},
        time::Instant,
    };

    use super::*;
    use crate::{
        control::{ControlOptions, file::ConfigFile, status::DaemonInfo},
        datapath::mem::MemDataplane,
    };

    fn controller() -> Arc<Controller> {
        let dp = MemDataplane::new();
        Controller::start(
            Box::new(dp.clone()),
            Arc::new(dp),
            ConfigFile::default(),
            ControlOptions {
                config_path: PathBuf::from("/nonexistent/clb.toml"),
                local_addrs: vec![],
                cpus: 1,
                info: DaemonInfo {
                    ifaces: vec![],
                    xdp_mode: "test".into(),
                    bpffs: PathBuf::new(),
                    config: PathBuf::new(),
                    started: Instant::now(),
                    upgraded: Default::default(),
                },
            },
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_failing_loop_is_restarted_and_reported() {
        let ctl = controller();
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        let h = spawn(ctl.clone(), "flaky", move || {
            let r = r.clone();
            async move {
                match r.fetch_add(1, Ordering::SeqCst) {
                    0 => panic!("first run panics"),
                    1 => anyhow::bail!("second run fails"),
                    _ => Ok(()),
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(5), h)
            .await
            .expect("the loop settles")
            .unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        let s = ctl.loops().all();
        let flaky = s.iter().find(|l| l.name == "flaky").unwrap();
        assert_eq!(flaky.restarts, 2);
        assert_eq!(flaky.state, LoopState::Stopped);
        assert_eq!(flaky.last_error.as_deref(), Some("second run fails"));
    }
}
