//! A directory's files refused alone, and the serving app winning a clash.

use super::*;

fn dir(label: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flyproxy-dir-{label}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

fn app(name: &str, port: u16, extra: &str) -> String {
    format!(
        r#"{{"Apps":[{{"Name":"{name}","Ports":[{port}],"Targets":["192.0.2.1:80"]{extra}}}]}}"#
    )
}

#[test]
fn a_bad_or_clashing_file_is_refused_alone_and_the_serving_app_wins() {
    refused_alone(|dir| dir.refresh(true), "clash");
}

/// The first load (start-up, `check`) takes the files in as a full refresh does.
#[test]
fn the_first_load_refuses_and_keeps_waiting_files_as_a_refresh_does() {
    refused_alone(Directory::load, "clash-load");
}

fn refused_alone(first: impl FnOnce(&mut Directory) -> Refresh, label: &str) {
    let d = dir(label);
    fs::write(d.join("a.json"), app("a", 7001, "")).unwrap();
    fs::write(d.join("b.json"), app("b", 7001, "")).unwrap();
    fs::write(d.join("c.json"), r#"{"Apps":[{"Name":"c"}]}"#).unwrap();
    fs::write(d.join("d.json"), app("a", 7002, "")).unwrap();
    fs::write(
        d.join("e.json"),
        app("e", 7001, r#","Hostnames":["e.example"]"#),
    )
    .unwrap();
    fs::write(d.join(".hidden.json"), "nonsense").unwrap();
    fs::write(d.join("notes.txt"), "nonsense").unwrap();
    let mut dir = Directory::open(&d);
    let r = first(&mut dir);
    assert!(r.changed);
    let names: Vec<String> = dir.config().apps.iter().map(|a| a.name.clone()).collect();
    assert_eq!(names, ["a", "e"]);
    assert_eq!(dir.counts(), (5, 2), "five files looked at, two serving");
    let rejected: Vec<&str> = r.rejected.iter().map(|r| r.file.as_str()).collect();
    assert_eq!(rejected, ["b.json", "c.json", "d.json"]);
    assert!(
        r.rejected[0].problems[0].contains("already used by app \"a\" (file a.json)"),
        "{:?}",
        r.rejected[0]
    );
    assert_eq!(r.rejected[1].problems.len(), 2, "{:?}", r.rejected[1]);
    assert!(r.rejected[2].problems[0].contains("already served from a.json"));

    // a goes: b, waiting for it, serves now; a change of d applies alone.
    fs::remove_file(d.join("a.json")).unwrap();
    fs::write(d.join("d.json"), app("d", 7003, "")).unwrap();
    let r = dir.refresh(false);
    assert!(r.changed && r.rejected.is_empty(), "{r:?}");
    let names: Vec<String> = dir.config().apps.iter().map(|a| a.name.clone()).collect();
    assert_eq!(names, ["b", "d", "e"]);

    // A broken new version of b: the last good one keeps serving.
    fs::write(d.join("b.json"), "{").unwrap();
    let r = dir.refresh(false);
    assert!(!r.changed);
    assert_eq!(r.rejected.len(), 1);
    assert!(dir.config().apps.iter().any(|a| a.name == "b"));
    assert_eq!(dir.rejected().len(), 2, "b and c");
    fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_target_that_is_another_files_frontend_is_a_loop() {
    let d = dir("loop");
    fs::write(d.join("a.json"), app("a", 7101, "")).unwrap();
    fs::write(
        d.join("b.json"),
        r#"{"Apps":[{"Name":"b","Ports":[7102],"Targets":["127.0.0.1:7101"]}]}"#,
    )
    .unwrap();
    fs::write(
        d.join("c.json"),
        r#"{"Apps":[{"Name":"c","Ports":[7103],"Targets":["127.0.0.1:7104"]}]}"#,
    )
    .unwrap();
    let mut dir = Directory::open(&d);
    let r = dir.refresh(true);
    let rejected: Vec<&str> = r.rejected.iter().map(|r| r.file.as_str()).collect();
    assert_eq!(rejected, ["b.json"], "{r:?}");
    // A newcomer whose frontend is c's target is refused: c serves on.
    fs::write(d.join("d.json"), app("d", 7104, "")).unwrap();
    let r = dir.refresh(false);
    assert_eq!(r.rejected.len(), 1, "{r:?}");
    assert!(r.rejected[0].problems[0].contains("app \"c\""), "{r:?}");
    fs::remove_dir_all(&d).unwrap();
}

/// Without inotify, a tick rescans only when the directory itself changed: a file renamed in
/// is seen, one rewritten in place waits for a full rescan (SIGHUP).
#[test]
fn without_inotify_the_directory_mtime_says_when_to_rescan() {
    let d = dir("no-inotify");
    fs::write(d.join("a.json"), app("a", 7201, "")).unwrap();
    let mut dir = Directory::open_unwatched(&d);
    assert!(dir.refresh(true).changed);
    assert!(!dir.refresh(false).changed, "nothing changed");
    fs::write(d.join(".b.tmp"), app("b", 7202, "")).unwrap();
    fs::rename(d.join(".b.tmp"), d.join("b.json")).unwrap();
    assert!(dir.refresh(false).changed, "renamed in");
    // Same size, in place: the directory's mtime does not move.
    fs::write(d.join("a.json"), app("a", 7203, "")).unwrap();
    assert!(!dir.refresh(false).changed);
    assert!(dir.refresh(true).changed, "a full rescan sees it");
    let ports: Vec<u16> = dir.config().apps.iter().map(|a| a.ports[0]).collect();
    assert_eq!(ports, [7203, 7202]);
    fs::remove_dir_all(&d).unwrap();
}

/// The diff a refresh gives, from the files that changed, is what comparing every app of the
/// configs before and after gives: apps added, removed (file deleted, or an app moved out of a
/// file), changed, moved between files unchanged (no change), ports added and removed; and a
/// file refused changes nothing.
#[test]
fn a_refresh_says_what_changed_as_a_whole_compare_would() {
    let d = dir("diff");
    fs::write(d.join("a.json"), app("a", 7001, "")).unwrap();
    fs::write(d.join("b.json"), app("b", 7002, "")).unwrap();
    let mut dir = Directory::open(&d);
    let mut before = Config { apps: Vec::new() };
    let mut step = |dir: &mut Directory, what: &str| {
        let r = dir.refresh(true);
        let now = dir.config();
        assert_eq!(r.diff, Diff::between(&before, &now), "{what}");
        before = now;
        r.diff
    };
    let first = step(&mut dir, "start");
    assert_eq!(first.apps_added, ["a", "b"]);
    assert_eq!(first.ports_added, [7001, 7002]);
    // a changes port, c comes, b goes.
    fs::write(d.join("a.json"), app("a", 7003, "")).unwrap();
    fs::write(d.join("c.json"), app("c", 7001, "")).unwrap();
    fs::remove_file(d.join("b.json")).unwrap();
    let diff = step(&mut dir, "change, add, remove");
    assert_eq!(
        (diff.apps_added, diff.apps_removed, diff.apps_changed),
        (vec!["c".into()], vec!["b".into()], vec!["a".into()])
    );
    assert_eq!(
        (diff.ports_added, diff.ports_removed),
        (vec![7003], vec![7002])
    );
    // c moves, unchanged, to another file: nothing changed.
    fs::remove_file(d.join("c.json")).unwrap();
    fs::write(d.join("d.json"), app("c", 7001, "")).unwrap();
    assert!(step(&mut dir, "move").is_empty());
    // Rewritten alike, and a refused file: nothing changed.
    fs::write(d.join("a.json"), app("a", 7003, "")).unwrap();
    fs::write(d.join("e.json"), app("a", 7004, "")).unwrap();
    assert!(step(&mut dir, "alike and refused").is_empty());
    // e waits for a's name: when a goes, e's a serves in its place (changed).
    fs::remove_file(d.join("a.json")).unwrap();
    let diff = step(&mut dir, "the waiting file serves");
    assert_eq!(diff.apps_changed, ["a"]);
    assert_eq!(
        (diff.ports_added, diff.ports_removed),
        (vec![7004], vec![7003])
    );
}

/// A table changed by each refresh's diff alone (`Routes::update_with`, the apps placed
/// between their neighbours) lists the apps in the directory's config order, as one built
/// whole does; and the digest is the sum of the SHA-256 of the files' `sha256sum` lines.
#[test]
fn a_table_changed_by_diffs_keeps_config_order_and_the_digest_sums_the_lines() {
    use crate::backends::routing::Routes;
    let d = dir("order");
    let mut dir = Directory::open(&d);
    dir.refresh(true);
    let mut routes = Routes::new(&dir.config(), None);
    // A small generator, so that the run is the same every time.
    let mut seed = 20u64;
    let mut next = |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    for step in 0..300 {
        let f = next(40);
        let file = d.join(format!("f{f:02}.json"));
        match next(4) {
            0 => {
                let _ = fs::remove_file(&file);
            }
            k => {
                // One or two apps in the file, each with a port of its own (no clash).
                let apps: Vec<String> = (0..1 + k % 2)
                    .map(|i| {
                        format!(
                            r#"{{"Name":"a{f:02}-{i}","Ports":[{}],"Targets":["192.0.2.1:{}"]}}"#,
                            7000 + f * 2 + i,
                            80 + next(3)
                        )
                    })
                    .collect();
                fs::write(&file, format!(r#"{{"Apps":[{}]}}"#, apps.join(","))).unwrap();
            }
        }
        let r = dir.refresh(true);
        let fresh = dir.fresh(&r.diff);
        let order = |each: &mut dyn FnMut(&str)| dir.each_name(each);
        routes = routes.update_with(&r.diff, &fresh, &order, false);
        let listed: Vec<&str> = routes.apps().iter().map(|(a, _)| a.name()).collect();
        let config = dir.config();
        let want: Vec<&str> = config.apps.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(listed, want, "step {step}");
    }
    // The digest, from the files as `sha256sum` lists them (every file passes here).
    let mut sum = digest::Digest::default();
    for e in fs::read_dir(&d).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        sum.add(digest::Line::new(
            sha256::hex(&fs::read(d.join(&name)).unwrap()).as_bytes(),
            &name,
        ));
    }
    assert_eq!(dir.sha256(), sum.hex());
}

#[test]
fn a_frontend_that_another_files_local_target_would_loop_into_is_refused_until_it_goes() {
    let d = dir("loops");
    let target = |name: &str, port: u16, to: &str| {
        format!(
            r#"{{"Apps":[{{"Name":"{name}","Ports":[{port}],"Targets":["192.0.2.1:80","{to}"]}}]}}"#
        )
    };
    fs::write(d.join("a.json"), target("a", 7101, "127.0.0.1:7201")).unwrap();
    fs::write(d.join("b.json"), target("b", 7102, "localhost:7201")).unwrap();
    fs::write(
        d.join("c.json"),
        r#"{"Apps":[{"Name":"c","Ports":[7201],"Addresses":["127.0.0.0/8"],"Targets":["192.0.2.1:80"]}]}"#,
    )
    .unwrap();
    let mut dir = Directory::open(&d);
    let r = dir.refresh(true);
    let rejected: Vec<&str> = r.rejected.iter().map(|r| r.file.as_str()).collect();
    assert_eq!(rejected, ["c.json"], "{r:?}");
    assert_eq!(
        r.rejected[0].problems,
        [
            "port 7201: would be a frontend that app \"a\" (file a.json) targets (\"127.0.0.1:7201\"): its connections would loop back into the proxy",
            "port 7201: would be a frontend that app \"b\" (file b.json) targets (\"localhost:7201\"): its connections would loop back into the proxy",
        ]
    );
    // a and b stop targeting it: c, waiting, serves; a target into c is then refused.
    fs::write(d.join("a.json"), target("a", 7101, "192.0.2.2:7201")).unwrap();
    fs::remove_file(d.join("b.json")).unwrap();
    let r = dir.refresh(false);
    assert!(r.changed && r.rejected.is_empty(), "{r:?}");
    assert!(dir.config().apps.iter().any(|a| a.name == "c"));
    fs::write(d.join("b.json"), target("b", 7102, "127.0.0.1:7201")).unwrap();
    let r = dir.refresh(false);
    assert_eq!(r.rejected.len(), 1, "{r:?}");
    assert!(
        r.rejected[0].problems[0].contains("is this proxy's own frontend"),
        "{r:?}"
    );
}
