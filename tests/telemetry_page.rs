//! The live telemetry page renders the actor graph with no internet: a mount runs in a
//! network namespace that has nothing but loopback (and a link to an empty neighbour),
//! and headless Chromium, in the same namespace, opens the page and waits until the graph
//! is drawn. The screenshot is kept as a test artifact in `target/tmp/telemetry-page.png`.

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::cluster::{netns_available, Net, Node};

/// Where the page is served inside the test's namespace.
const PAGE: &str = "http://127.0.0.1:19900/";

/// How long Chromium may take to answer, and to draw the graph (it compiles viz.js, 1.4 MB).
const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(90);

/// Debian's `chromium`; missing fails under CI (see `common::fuse_available`).
fn chromium() -> Option<PathBuf> {
    let found = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| path.exists());
    if found.is_none() {
        if std::env::var_os("CI").is_some() {
            panic!("the telemetry page test needs Debian's chromium package; CI is set, so this is a failure");
        }
        eprintln!("SKIP: the telemetry page test needs Debian's chromium package");
    }
    found
}

/// Headless Chromium in namespace `ns`, driven over the DevTools protocol on a pipe
/// (`--remote-debugging-pipe`: commands in on fd 3, answers out on fd 4, each a JSON
/// message ended by a NUL byte). A page that draws with a web worker and
/// `requestAnimationFrame` is only drawn in real time, which `--dump-dom` does not wait for.
struct Browser {
    child: Child,
    log: PathBuf,
    commands: File,
    answers: mpsc::Receiver<Value>,
    next_id: u64,
    session: Option<String>,
}

impl Browser {
    fn start(ns: &str, browser: &Path, profile: &Path) -> Browser {
        let (to_browser_read, to_browser_write) = pipe();
        let (from_browser_read, from_browser_write) = pipe();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{ns}"))
            .arg("--")
            .arg(browser)
            .args([
                "--headless",
                // Root cannot use Chromium's sandbox; the page is our own.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--window-size=1280,900",
                // The page draws in requestAnimationFrame and polls with timers: never
                // throttle them as for a tab in the background.
                "--disable-background-timer-throttling",
                "--disable-renderer-backgrounding",
                "--disable-backgrounding-occluded-windows",
                "--remote-debugging-pipe",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .env("HOME", profile)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(profile.join("chromium.log")).expect("chromium's log"));
        let (child_in, child_out) = (to_browser_read.as_raw_fd(), from_browser_write.as_raw_fd());
        // SAFETY: only async-signal-safe fcntl and dup2 calls between fork and exec. The
        // pipe ends are first copied above 9, so that neither is overwritten by the other's
        // dup2 and a pipe end already at 3 or 4 loses its close-on-exec flag too.
        unsafe {
            cmd.pre_exec(move || {
                let input = libc::fcntl(child_in, libc::F_DUPFD, 10);
                let output = libc::fcntl(child_out, libc::F_DUPFD, 10);
                if input < 0 || output < 0 || libc::dup2(input, 3) < 0 || libc::dup2(output, 4) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start chromium");
        drop((to_browser_read, from_browser_write));
        let (tx, answers) = mpsc::channel();
        let mut reader = BufReader::new(File::from(from_browser_read));
        std::thread::spawn(move || loop {
            let mut message = Vec::new();
            match reader.read_until(0, &mut message) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    message.pop();
                    if let Ok(value) = serde_json::from_slice::<Value>(&message) {
                        if tx.send(value).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Browser {
            child,
            log: profile.join("chromium.log"),
            commands: File::from(to_browser_write),
            answers,
            next_id: 1,
            session: None,
        }
    }

    /// Sends one command (to the attached page, once there is one) and returns its result.
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = &self.session {
            message["sessionId"] = json!(session);
        }
        let mut bytes = serde_json::to_vec(&message).expect("a JSON command");
        bytes.push(0);
        if let Err(err) = self.commands.write_all(&bytes) {
            panic!(
                "cannot send {method} to chromium ({err}); its log:\n{}",
                self.log()
            );
        }
        let deadline = Instant::now() + CHROMIUM_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let answer = self.answers.recv_timeout(left).unwrap_or_else(|_| {
                panic!("chromium did not answer {method}; its log:\n{}", self.log())
            });
            if answer["id"] == json!(id) {
                assert!(answer["error"].is_null(), "{method} failed: {answer}");
                return answer["result"].clone();
            }
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Shows `url` in the browser's one tab, in front.
    fn open(&mut self, url: &str) {
        let targets = self.call("Target.getTargets", json!({}));
        let tab = targets["targetInfos"]
            .as_array()
            .and_then(|targets| targets.iter().find(|target| target["type"] == "page"))
            .map(|tab| tab["targetId"].clone())
            .unwrap_or_else(|| panic!("chromium has no tab: {targets}"));
        let attached = self.call(
            "Target.attachToTarget",
            json!({"targetId": tab, "flatten": true}),
        );
        self.session = attached["sessionId"].as_str().map(str::to_owned);
        assert!(self.session.is_some(), "no session: {attached}");
        self.call("Page.bringToFront", json!({}));
        self.call("Page.navigate", json!({"url": url}));
    }

    /// The value of a JavaScript expression in the page.
    fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true}),
        );
        result["result"]["value"].clone()
    }

    fn dom(&mut self) -> String {
        let dom = self.eval("document.documentElement.outerHTML");
        dom.as_str().unwrap_or_default().to_owned()
    }

    fn screenshot(&mut self) -> Vec<u8> {
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let data = shot["data"].as_str().expect("screenshot data");
        data_encoding::BASE64
            .decode(data.as_bytes())
            .expect("base64 screenshot")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just created and are owned by nothing else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

#[test]
fn the_telemetry_page_shows_the_actor_graph_offline() {
    if !netns_available() {
        return;
    }
    let Some(browser) = chromium() else {
        return;
    };
    let net = Net::pair();
    let mut node = Node::new("telemetry", Some(&net.a));
    node.start(&["telemetry=127.0.0.1:19900".to_owned()]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !node.log().contains("telemetry page at") {
        assert!(
            Instant::now() < deadline,
            "the telemetry page did not start:\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let profile = tempfile::tempdir().expect("a Chromium profile folder");
    let mut chromium = Browser::start(&net.a, &browser, profile.path());
    chromium.open(PAGE);

    // The graph appears once the worker's first fetch of graph.dot is laid out by viz.js,
    // and fills in as each actor first reports.
    let actors = ["capture", "coalescer", "indexer", "scanner"];
    let drawn = |dom: &str| dom.contains("<svg") && actors.iter().all(|actor| dom.contains(actor));
    let deadline = Instant::now() + CHROMIUM_TIMEOUT;
    let mut dom = chromium.dom();
    while !drawn(&dom) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        dom = chromium.dom();
    }
    if !dom.contains("<svg") {
        let loads = chromium.eval(
            "JSON.stringify({state: document.readyState, loaded: performance.getEntriesByType('resource').map(e => e.name + ' ' + Math.round(e.duration) + ' ms ' + e.responseStatus)})",
        );
        panic!("the graph was not drawn ({loads}):\n{dom}");
    }
    for actor in actors {
        assert!(
            dom.contains(actor),
            "the drawn graph does not show the actor {actor}:\n{dom}"
        );
    }

    let broken = chromium.eval(
        "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)",
    );
    assert_eq!(broken, json!([]), "images of the page that did not load");

    let png = chromium.screenshot();
    assert!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("telemetry-page.png");
    std::fs::write(&screenshot, &png).expect("save the screenshot");
    eprintln!("screenshot of the telemetry page: {}", screenshot.display());
}
