//! The guest's user space: the skeleton, the Debian tools with the shared libraries they need,
//! and busybox for everything else.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs;
use std::path::Path;
use std::process::Command;

use super::apt::{resolve_in, run_host, Stage};
use super::Tool;
use crate::cpio::{Entry, Tree};
use crate::{elf, Error, Result};

/// Where the guest keeps shared libraries (the loader's default path on Debian).
const GUEST_LIB_DIR: &str = "lib/x86_64-linux-gnu";
/// The dynamic loader programs name in `PT_INTERP` (`/lib64/…`).
const LOADER: &str = "ld-linux-x86-64.so.2";

/// Mount points, `/dev/console` (the kernel opens it for init before devtmpfs is mounted),
/// `/init` and the few files programs expect in `/etc`.
pub(super) fn add_base(tree: &mut Tree, init: &str) {
    for dir in [
        "proc", "sys", "dev", "tmp", "run", "root", "mnt", "etc", "var", "bin", "sbin", "usr/bin",
        "usr/sbin",
    ] {
        tree.dir(dir);
    }
    tree.insert(
        "dev/console",
        Entry::CharDev {
            perm: 0o600,
            major: 5,
            minor: 1,
        },
    );
    tree.insert(
        "init",
        Entry::File {
            perm: 0o755,
            data: init.as_bytes().to_vec(),
        },
    );
    tree.insert(
        "etc/passwd",
        Entry::File {
            perm: 0o644,
            data: b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
        },
    );
    tree.insert(
        "etc/group",
        Entry::File {
            perm: 0o644,
            data: b"root:x:0:\n".to_vec(),
        },
    );
}

/// Copies each tool's files to their paths in the package, and the shared libraries the
/// programs need (`DT_NEEDED`, transitively). A library no unpacked package has is looked for
/// in the library packages the needing package depends on, which are downloaded then.
/// Returns the tools' program names and each library's package.
pub(super) fn add_tools(
    tree: &mut Tree,
    stage: &mut Stage,
    tools: &[Tool],
) -> Result<(BTreeSet<String>, BTreeMap<String, String>)> {
    let mut names = BTreeSet::new();
    // (what, its package, its bytes): ELF files whose libraries are still to be found.
    let mut queue = VecDeque::new();
    for tool in tools {
        let root = stage.root(tool.package)?.to_path_buf();
        for file in tool.files {
            let rel = [file.to_string(), format!("usr/{file}")]
                .into_iter()
                .find(|rel| fs::symlink_metadata(root.join(rel)).is_ok())
                .ok_or_else(|| Error::Image(format!("package {} has no {file}", tool.package)))?;
            let source = resolve_in(&root, Path::new(&rel))?;
            let data = fs::read(&source)
                .map_err(|e| Error::io(format!("read {}", source.display()), e))?;
            let program = elf::is_elf(&data);
            if program {
                queue.push_back((file.to_string(), tool.package.to_string(), data.clone()));
                if let Some(name) = Path::new(file).file_name() {
                    names.insert(name.to_string_lossy().into_owned());
                }
            }
            let perm = if program { 0o755 } else { 0o644 };
            tree.insert(file, Entry::File { perm, data });
        }
    }

    let mut libraries = BTreeMap::new();
    loop {
        // Sonames no unpacked package has, with who needs them: fetched in one round below.
        let mut waiting = Vec::new();
        let mut missing = BTreeMap::new();
        while let Some((what, package, data)) = queue.pop_front() {
            let needed =
                elf::needed(&data).map_err(|e| Error::Image(format!("read {what}: {e}")))?;
            let mut complete = true;
            for soname in needed {
                if libraries.contains_key(&soname) {
                    continue;
                }
                let Some((owner, file)) = stage.find_library(&soname) else {
                    missing.insert(soname, (what.clone(), package.clone()));
                    complete = false;
                    continue;
                };
                let bytes = fs::read(&file)
                    .map_err(|e| Error::io(format!("read {}", file.display()), e))?;
                tree.insert(
                    &format!("{GUEST_LIB_DIR}/{soname}"),
                    Entry::File {
                        perm: 0o755,
                        data: bytes.clone(),
                    },
                );
                queue.push_back((soname.clone(), owner.clone(), bytes));
                libraries.insert(soname, owner);
            }
            if !complete {
                waiting.push((what, package, data));
            }
        }
        if missing.is_empty() {
            break;
        }
        // Debian packages depend on the packages of the libraries they link to.
        let needers: BTreeSet<String> = missing.values().map(|(_, p)| p.clone()).collect();
        let needers: Vec<String> = needers.into_iter().collect();
        let candidates: BTreeSet<String> = stage
            .apt()
            .library_depends(&needers)?
            .into_values()
            .flatten()
            .filter(|dep| !stage.unpacked.contains_key(dep))
            .collect();
        if candidates.is_empty() {
            let (soname, (what, package)) = missing
                .into_iter()
                .next()
                .expect("missing is not empty here");
            return Err(Error::Image(format!(
                "{soname}, needed by {what} (package {package}), is in no package it depends on"
            )));
        }
        stage.fetch(&candidates.into_iter().collect::<Vec<_>>())?;
        queue.extend(waiting);
    }
    if libraries.contains_key(LOADER) {
        tree.insert(
            &format!("lib64/{LOADER}"),
            Entry::Symlink {
                target: format!("/{GUEST_LIB_DIR}/{LOADER}"),
            },
        );
    }
    Ok((names, libraries))
}

/// The static busybox and a link for each of its applets that no Debian tool provides (by
/// name, so `PATH` order does not matter).
pub(super) fn add_busybox(
    tree: &mut Tree,
    stage: &Stage,
    package: &str,
    tool_names: &BTreeSet<String>,
) -> Result<()> {
    let root = stage.root(package)?;
    let busybox = resolve_in(root, Path::new("bin/busybox"))?;
    let applets = run_host(
        Command::new(&busybox).arg("--list-full"),
        "list busybox's applets",
    )?;
    tree.insert(
        "bin/busybox",
        Entry::File {
            perm: 0o755,
            data: fs::read(&busybox)
                .map_err(|e| Error::io(format!("read {}", busybox.display()), e))?,
        },
    );
    for applet in applets.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let name = applet.rsplit('/').next().unwrap_or(applet);
        if tool_names.contains(name) || tree.contains(applet) {
            continue;
        }
        tree.insert(
            applet,
            Entry::Symlink {
                target: "/bin/busybox".to_string(),
            },
        );
    }
    if !tree.contains("bin/sh") {
        return Err(Error::Image(format!("{package} provides no bin/sh")));
    }
    Ok(())
}
