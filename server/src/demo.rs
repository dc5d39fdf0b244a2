//! `--demo-pages DIR`: static files under `/demo/`, for the demo extension's fixture pages.
//!
//! Off by default. The demo extension's content script runs on a fixture PR page that must be
//! served over http from a known origin; serving it from the backend itself saves the demo and
//! the end-to-end tests a second server. This is a development aid, not a web server: GET and
//! HEAD only, no directory listings, no ranges, no caching headers.

use std::path::{Component, Path, PathBuf};

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::problem::Problem;

/// The canonical directory the files come from.
#[derive(Clone)]
pub struct DemoPages(PathBuf);

impl DemoPages {
    /// Checks that `dir` is a directory and remembers its canonical path.
    pub fn new(dir: &Path) -> Result<Self, String> {
        let dir = dir
            .canonicalize()
            .map_err(|e| format!("--demo-pages {}: {e}", dir.display()))?;
        if !dir.is_dir() {
            return Err(format!("--demo-pages {}: not a directory", dir.display()));
        }
        Ok(DemoPages(dir))
    }

    /// The file a request path names, if it lies inside the directory. Only plain components
    /// are accepted, so `..` and absolute paths cannot leave it; symlinks are resolved and
    /// checked again for the same reason.
    fn resolve(&self, rest: &str) -> Option<PathBuf> {
        let relative = Path::new(rest);
        if rest.is_empty()
            || !relative
                .components()
                .all(|c| matches!(c, Component::Normal(_)))
        {
            return None;
        }
        let file = self.0.join(relative).canonicalize().ok()?;
        (file.starts_with(&self.0) && file.is_file()).then_some(file)
    }
}

/// `GET /demo/{*path}`.
pub async fn serve(State(pages): State<DemoPages>, UrlPath(rest): UrlPath<String>) -> Response {
    // Path resolution and the read are blocking file system calls; keep them off the runtime.
    let found = tokio::task::spawn_blocking(move || {
        let file = pages.resolve(&rest).ok_or_else(|| rest.clone())?;
        let bytes = std::fs::read(&file).map_err(|_| rest.clone())?;
        Ok::<_, String>((content_type(&file), bytes))
    })
    .await;
    match found {
        Ok(Ok((content_type, bytes))) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
            bytes,
        )
            .into_response(),
        Ok(Err(rest)) => Problem::not_found(format!("no demo page /demo/{rest}")).into_response(),
        Err(_) => Problem::not_found("the demo page could not be read").into_response(),
    }
}

fn content_type(file: &Path) -> &'static str {
    match file.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("json") => "application/json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_files_inside_the_directory_resolve() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("pages");
        std::fs::create_dir_all(dir.join("pr")).unwrap();
        std::fs::write(dir.join("pr/17.html"), "<p>").unwrap();
        std::fs::write(root.path().join("outside.txt"), "x").unwrap();
        let pages = DemoPages::new(&dir).unwrap();
        assert!(pages.resolve("pr/17.html").is_some());
        for bad in [
            "",
            "pr",
            "../outside.txt",
            "pr/../../outside.txt",
            "/etc/passwd",
            "nope.html",
        ] {
            assert!(pages.resolve(bad).is_none(), "{bad:?} resolved");
        }
    }
}
