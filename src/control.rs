//! The mount daemon's control socket: `<state folder>/control.sock`, owner-only, one
//! command per connection, one line each way. `filesync status` asks `status` (the answer
//! is the mount's [`crate::status::MountStatus`] as JSON); `filesync revert` asks `revert`.
//!
//! The parts of the daemon that answer a command register it in the mount's [`Commands`],
//! so the socket exists for every mount, replicating or not.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

/// The socket's name in the mount's state folder.
pub const SOCKET_NAME: &str = "control.sock";

/// How long either side waits for the other.
const TIMEOUT: Duration = Duration::from_secs(10);

/// How long a new daemon waits for the previous daemon of its state folder to let go
/// of the control socket.
const HANDOVER: Duration = Duration::from_secs(5);

/// The longest command line accepted.
const MAX_LINE: u64 = 4096;

/// The longest answer read: a status report with many peers is a few hundred bytes each.
const MAX_ANSWER: u64 = 4 * 1024 * 1024;

type Handler = Arc<dyn Fn() -> String + Send + Sync>;

/// The commands one daemon answers, by name.
#[derive(Clone, Default)]
pub struct Commands {
    handlers: Arc<Mutex<BTreeMap<String, Handler>>>,
}

impl Commands {
    /// Makes `name` answered by `handler` (replacing an earlier handler of that name).
    pub fn register(&self, name: &str, handler: impl Fn() -> String + Send + Sync + 'static) {
        self.handlers
            .lock()
            .insert(name.to_owned(), Arc::new(handler));
    }

    /// The answer to one command line.
    pub fn answer(&self, command: &str) -> String {
        let handler = self.handlers.lock().get(command).cloned();
        match handler {
            Some(handler) => handler(),
            None => {
                let known: Vec<String> = self
                    .handlers
                    .lock()
                    .keys()
                    .map(|name| format!("'{name}'"))
                    .collect();
                format!(
                    "unknown command '{command}': this daemon knows {}",
                    known.join(", ")
                )
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "cannot open the control socket {path}: {source}; check the state folder's permissions"
    )]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another filesync daemon is using the state folder {state_dir}: unmount it first, or give this mount its own state_dir=")]
    InUse { state_dir: PathBuf },
    #[error("cannot reach the filesync daemon at {path}: {source}; is the folder mounted (and is this its state folder)?")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the filesync daemon at {path} did not answer: {source}")]
    Exchange {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Serves commands on `state_dir/control.sock` in a thread until the process ends. Each
/// command is handed to `handle`, whose answer (one line) goes back.
pub fn serve(
    state_dir: &Path,
    handle: impl Fn(&str) -> String + Send + 'static,
) -> Result<(), ControlError> {
    let path = state_dir.join(SOCKET_NAME);
    let bind_err = |source| ControlError::Bind {
        path: path.clone(),
        source,
    };
    // A socket that still answers may be a daemon of the same folder that was just
    // unmounted and is finishing (a remount right after `umount`): give it a moment.
    let handover_until = std::time::Instant::now() + HANDOVER;
    while UnixStream::connect(&path).is_ok() {
        if std::time::Instant::now() >= handover_until {
            return Err(ControlError::InUse {
                state_dir: state_dir.to_path_buf(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // A socket left by a daemon that was killed: nobody listens on it any more.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(bind_err)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                if let Err(err) = answer(stream, &handle) {
                    tracing::debug!("control connection failed: {err}");
                }
            }
        })
        .map_err(bind_err)?;
    Ok(())
}

fn answer(stream: UnixStream, handle: &impl Fn(&str) -> String) -> std::io::Result<()> {
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let mut line = String::new();
    // At most MAX_LINE bytes, so a client cannot make the daemon buffer more.
    BufReader::new((&stream).take(MAX_LINE)).read_line(&mut line)?;
    let reply = handle(line.trim());
    (&stream).write_all(format!("{}\n", reply.replace('\n', " ")).as_bytes())
}

/// Sends `command` to the daemon whose state folder is `state_dir`; returns its answer.
pub fn request(state_dir: &Path, command: &str) -> Result<String, ControlError> {
    let path = state_dir.join(SOCKET_NAME);
    let stream = UnixStream::connect(&path).map_err(|source| ControlError::Connect {
        path: path.clone(),
        source,
    })?;
    let exchange = |source| ControlError::Exchange {
        path: path.clone(),
        source,
    };
    stream.set_read_timeout(Some(TIMEOUT)).map_err(exchange)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(exchange)?;
    (&stream)
        .write_all(format!("{command}\n").as_bytes())
        .map_err(exchange)?;
    let mut reply = String::new();
    BufReader::new((&stream).take(MAX_ANSWER))
        .read_line(&mut reply)
        .map_err(exchange)?;
    Ok(reply.trim_end().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_answer_by_name() {
        let commands = Commands::default();
        commands.register("status", || "{}".to_owned());
        commands.register("revert", || "nothing to revert".to_owned());
        assert_eq!(commands.answer("status"), "{}");
        assert_eq!(
            commands.answer("reboot"),
            "unknown command 'reboot': this daemon knows 'revert', 'status'"
        );
    }

    #[test]
    fn a_request_gets_the_answer_over_the_socket() {
        let dir = tempfile::tempdir().expect("temp dir");
        let commands = Commands::default();
        let long = "x".repeat(100_000);
        let answer = long.clone();
        commands.register("status", move || answer.clone());
        let serving = commands.clone();
        serve(dir.path(), move |line| serving.answer(line)).expect("serve");
        let mode = std::fs::metadata(dir.path().join(SOCKET_NAME))
            .expect("socket")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(request(dir.path(), "status").expect("answer"), long);
    }
}
