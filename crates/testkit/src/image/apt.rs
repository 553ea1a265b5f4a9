//! Debian packages: versions and dependencies from APT, `apt-get download`, `dpkg-deb -x`.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::{Error, Result};

/// Where a package keeps shared libraries.
const LIB_DIRS: &[&str] = &[
    "lib/x86_64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "lib64",
    "usr/lib64",
    "lib",
    "usr/lib",
];

/// APT, with its binary caches (`pkgcache.bin`) kept in the VM cache: this machine's
/// configuration may turn them off (Debian's container images do), and without them every call
/// parses all package lists again, which takes seconds.
#[derive(Debug, Clone)]
pub(super) struct Apt {
    cache: PathBuf,
}

impl Apt {
    pub(super) fn new(root: &Path) -> Result<Apt> {
        let cache = root.join("apt");
        fs::create_dir_all(&cache)
            .map_err(|e| Error::io(format!("create {}", cache.display()), e))?;
        Ok(Apt { cache })
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command
            .arg("-o")
            .arg(format!(
                "Dir::Cache::pkgcache={}",
                self.cache.join("pkgcache.bin").display()
            ))
            .arg("-o")
            .arg(format!(
                "Dir::Cache::srcpkgcache={}",
                self.cache.join("srcpkgcache.bin").display()
            ));
        command
    }

    /// Runs `apt-get update` once per process (as root); false when it was already tried.
    pub(super) fn update_once(&self) -> Result<bool> {
        static TRIED: AtomicBool = AtomicBool::new(false);
        if TRIED.swap(true, Ordering::SeqCst) {
            return Ok(false);
        }
        eprintln!("strata-testkit: running `apt-get update` to find the test VM's packages");
        run_host(
            self.command("apt-get").args(["update", "-qq"]),
            "update APT's package lists",
        )?;
        Ok(true)
    }

    /// The kernel package a meta-package (`linux-image-amd64`) depends on.
    pub(super) fn kernel_package(&self, meta: &str) -> Result<String> {
        let depends = run_host(
            self.command("apt-cache").args(["depends", meta]),
            "find the kernel package",
        )?;
        depends
            .lines()
            .filter_map(|line| line.trim().strip_prefix("Depends:"))
            .map(str::trim)
            .find(|name| name.starts_with("linux-image-"))
            .map(str::to_string)
            .ok_or_else(|| {
                Error::Image(format!(
                    "APT names no kernel for {meta}; run `apt-get update` (scripts/test.sh \
                     does)\n{depends}"
                ))
            })
    }

    /// The version APT would install of each package.
    pub(super) fn candidate_versions(
        &self,
        packages: &[String],
    ) -> Result<BTreeMap<String, String>> {
        let show = run_host(
            self.command("apt-cache")
                .args(["show", "--no-all-versions"])
                .args(packages),
            "look up package versions",
        )?;
        let mut versions = BTreeMap::new();
        let mut current = None;
        for line in show.lines() {
            if let Some(name) = line.strip_prefix("Package: ") {
                current = Some(name.trim().to_string());
            } else if let Some(version) = line.strip_prefix("Version: ") {
                if let Some(name) = current.take() {
                    versions
                        .entry(name)
                        .or_insert_with(|| version.trim().to_string());
                }
            }
        }
        let missing: Vec<_> = packages
            .iter()
            .filter(|name| !versions.contains_key(*name))
            .collect();
        if !missing.is_empty() {
            return Err(Error::Image(format!(
                "APT has no candidate for {missing:?}; run `apt-get update` (scripts/test.sh does)"
            )));
        }
        Ok(versions)
    }

    /// For each package, the library packages it depends on (those that can hold a shared
    /// library: `lib*`, `zlib*`).
    pub(super) fn library_depends(
        &self,
        packages: &[String],
    ) -> Result<BTreeMap<String, Vec<String>>> {
        let depends = run_host(
            self.command("apt-cache")
                .args([
                    "depends",
                    "--no-recommends",
                    "--no-suggests",
                    "--no-conflicts",
                    "--no-breaks",
                    "--no-replaces",
                    "--no-enhances",
                ])
                .args(packages),
            "look up package dependencies",
        )?;
        Ok(parse_library_depends(&depends))
    }

    /// Downloads packages (`name` or `name=version`) into `dir`.
    fn download(&self, dir: &Path, specs: &[String]) -> Result<()> {
        run_host(
            self.command("apt-get")
                .current_dir(dir)
                .args(["download", "-qq", "-o", "APT::Sandbox::User=root"])
                .args(specs),
            "download the test VM's packages",
        )?;
        Ok(())
    }
}

/// `apt-cache depends` output: a package name at the start of a line, then its relations
/// indented (`  Depends: x`, ` |Depends: y` for alternatives, `    z` for providers of a
/// virtual package, which are not taken).
fn parse_library_depends(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current = None;
    for line in text.lines() {
        if !line.starts_with(' ') {
            current = Some(line.trim().to_string());
            continue;
        }
        let Some(package) = current.as_ref() else {
            continue;
        };
        let relation = line.trim().trim_start_matches('|');
        let Some(name) = relation
            .strip_prefix("Depends:")
            .or_else(|| relation.strip_prefix("PreDepends:"))
        else {
            continue;
        };
        let name = name.trim();
        let name = name.split(':').next().unwrap_or(name);
        if name.starts_with("lib") || name.starts_with("zlib") {
            let deps = out.entry(package.clone()).or_default();
            if !deps.iter().any(|dep| dep == name) {
                deps.push(name.to_string());
            }
        }
    }
    out
}

/// Runs a host command; its stdout on success.
pub(super) fn run_host(command: &mut Command, what: &str) -> Result<String> {
    let program = command.get_program().to_string_lossy().into_owned();
    let line = std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ");
    let output = command.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Missing {
                hint: format!(
                    "the test VM is built with {program} (a Debian machine's APT tools); \
                     scripts/test.sh installs what the tests need"
                ),
                program: program.clone(),
            }
        } else {
            Error::io(format!("{what}: start `{line}`"), e)
        }
    })?;
    if !output.status.success() {
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        let hint = if program.starts_with("apt") {
            "; check that this machine reaches Debian's archive, and run `apt-get update`"
        } else {
            ""
        };
        return Err(Error::HostCommand {
            what: what.to_string(),
            command: line,
            status: output.status.to_string(),
            output: text,
            hint: hint.to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Downloaded and unpacked packages.
pub(super) struct Stage {
    apt: Apt,
    debs: PathBuf,
    pkgs: PathBuf,
    /// Package → where it is unpacked.
    pub(super) unpacked: BTreeMap<String, PathBuf>,
    /// Package → the .deb's file name (the version is in it).
    pub(super) files: BTreeMap<String, String>,
}

impl Stage {
    pub(super) fn new(apt: Apt, work: &Path) -> Result<Stage> {
        match fs::remove_dir_all(work) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("remove {}", work.display()), e)),
        }
        let stage = Stage {
            apt,
            debs: work.join("debs"),
            pkgs: work.join("pkgs"),
            unpacked: BTreeMap::new(),
            files: BTreeMap::new(),
        };
        for dir in [&stage.debs, &stage.pkgs] {
            fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        }
        Ok(stage)
    }

    /// Downloads (`name` or `name=version`) and unpacks each package.
    pub(super) fn fetch(&mut self, specs: &[String]) -> Result<()> {
        if let Err(first) = self.apt.download(&self.debs, specs) {
            // The lists may name versions the archive no longer has.
            if !self.apt.update_once()? {
                return Err(first);
            }
            self.apt.download(&self.debs, specs)?;
        }
        let entries = fs::read_dir(&self.debs)
            .map_err(|e| Error::io(format!("list {}", self.debs.display()), e))?;
        let mut debs = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(format!("list {}", self.debs.display()), e))?;
            debs.push(entry.file_name().to_string_lossy().into_owned());
        }
        for spec in specs {
            let name = spec.split('=').next().unwrap_or(spec);
            let prefix = format!("{name}_");
            let deb = debs
                .iter()
                .find(|file| file.starts_with(&prefix) && file.ends_with(".deb"))
                .ok_or_else(|| Error::Image(format!("apt-get download left no .deb for {spec}")))?;
            let dir = self.pkgs.join(name);
            run_host(
                Command::new("dpkg-deb")
                    .arg("-x")
                    .arg(self.debs.join(deb))
                    .arg(&dir),
                "unpack a package",
            )?;
            self.unpacked.insert(name.to_string(), dir);
            self.files.insert(name.to_string(), deb.clone());
        }
        Ok(())
    }

    pub(super) fn apt(&self) -> &Apt {
        &self.apt
    }

    pub(super) fn root(&self, package: &str) -> Result<&Path> {
        self.unpacked
            .get(package)
            .map(PathBuf::as_path)
            .ok_or_else(|| Error::Image(format!("package {package} was not unpacked")))
    }

    /// A shared library by soname in any unpacked package: (package, file).
    pub(super) fn find_library(&self, soname: &str) -> Option<(String, PathBuf)> {
        for (package, root) in &self.unpacked {
            for dir in LIB_DIRS {
                let rel = Path::new(dir).join(soname);
                if fs::symlink_metadata(root.join(&rel)).is_ok() {
                    if let Ok(file) = resolve_in(root, &rel) {
                        return Some((package.clone(), file));
                    }
                }
            }
        }
        None
    }
}

/// `rel` inside the unpacked tree `root`, with symbolic links followed inside that tree
/// (absolute targets are relative to `root`).
pub(super) fn resolve_in(root: &Path, rel: &Path) -> Result<PathBuf> {
    let mut rel = normalize(rel);
    for _ in 0..32 {
        let path = root.join(&rel);
        let meta = fs::symlink_metadata(&path)
            .map_err(|e| Error::io(format!("look at {}", path.display()), e))?;
        if !meta.file_type().is_symlink() {
            return Ok(path);
        }
        let target = fs::read_link(&path)
            .map_err(|e| Error::io(format!("read link {}", path.display()), e))?;
        rel = if target.is_absolute() {
            normalize(&target)
        } else {
            normalize(&rel.parent().unwrap_or(Path::new("")).join(target))
        };
    }
    Err(Error::Image(format!(
        "too many symbolic links at {}",
        root.join(rel).display()
    )))
}

/// `path` without `/`, `.` and `..` components (lexically), relative.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_depends_are_parsed_per_package() {
        let text =
            "nbd-client\n  PreDepends: debconf\n  Depends: libc6\n |Depends: libgnutls30\n  \
                    Depends: <debconf-2.0>\n    cdebconf\n  Depends: zlib1g:amd64\n\
                    libc6\n  Depends: libgcc-s1\n";
        let parsed = parse_library_depends(text);
        assert_eq!(parsed["nbd-client"], ["libc6", "libgnutls30", "zlib1g"]);
        assert_eq!(parsed["libc6"], ["libgcc-s1"]);
    }

    #[test]
    fn links_resolve_inside_the_tree() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let root = dir.path();
        fs::create_dir_all(root.join("lib/x86_64-linux-gnu")).expect("mkdir");
        fs::create_dir_all(root.join("lib64")).expect("mkdir");
        fs::write(root.join("lib/x86_64-linux-gnu/ld.so"), b"x").expect("write");
        std::os::unix::fs::symlink("/lib/x86_64-linux-gnu/ld.so", root.join("lib64/ld.so"))
            .expect("symlink");
        std::os::unix::fs::symlink("../lib64/ld.so", root.join("lib/rel.so")).expect("symlink");
        assert_eq!(
            resolve_in(root, Path::new("lib64/ld.so")).expect("resolve"),
            root.join("lib/x86_64-linux-gnu/ld.so")
        );
        assert_eq!(
            resolve_in(root, Path::new("lib/rel.so")).expect("resolve"),
            root.join("lib/x86_64-linux-gnu/ld.so")
        );
    }
}
