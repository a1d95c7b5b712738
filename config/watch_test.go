package config

import (
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

// quiet is how long a test waits to conclude that an event it must not
// cause was not reported: inotify delivers within microseconds.
const quiet = 300 * time.Millisecond

func startWatcher(t *testing.T, path string) *Watcher {
	t.Helper()
	w, err := NewWatcher(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.Close() })
	return w
}

func expectChange(t *testing.T, w *Watcher, what string) {
	t.Helper()
	select {
	case <-w.Changes():
	case <-time.After(5 * time.Second):
		t.Fatalf("%s: no change reported", what)
	}
}

func expectNoChange(t *testing.T, w *Watcher, what string) {
	t.Helper()
	select {
	case <-w.Changes():
		t.Errorf("%s: reported as a change of the config file", what)
	case <-time.After(quiet):
	}
}

func writeFile(t *testing.T, path, text string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
}

// The watch reports the config file's own changes, written in place,
// renamed over it or removed, and nothing that happens to the other files
// of its directory.
func TestWatcherReportsOnlyTheConfigFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "l4lb.toml")
	writeFile(t, path, "a")
	w := startWatcher(t, path)

	writeFile(t, filepath.Join(dir, "other.txt"), "x")
	if err := os.Rename(filepath.Join(dir, "other.txt"), filepath.Join(dir, "other2.txt")); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(dir, "other2.txt")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("l4lb.toml", filepath.Join(dir, "link.toml")); err != nil {
		t.Fatal(err)
	}
	expectNoChange(t, w, "other files created, renamed, removed")

	writeFile(t, path, "b")
	expectChange(t, w, "written in place")
	writeFile(t, filepath.Join(dir, ".l4lb.toml.tmp"), "c")
	if err := os.Rename(filepath.Join(dir, ".l4lb.toml.tmp"), path); err != nil {
		t.Fatal(err)
	}
	expectChange(t, w, "renamed over")
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	expectChange(t, w, "removed")
	if err := os.Symlink("link-target.toml", path); err != nil {
		t.Fatal(err)
	}
	expectChange(t, w, "made a symlink")
}

// A config file created empty and then written (install, scp, curl -o) is
// reported once its writer closes it, not when it is created: a reload
// then would read it half written.
func TestWatcherWaitsForANewFileToBeWritten(t *testing.T) {
	path := filepath.Join(t.TempDir(), "l4lb.toml")
	w := startWatcher(t, path)
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString("[services.pg]\n"); err != nil {
		t.Fatal(err)
	}
	expectNoChange(t, w, "created and half written")
	if _, err := f.WriteString("listen = \"127.0.0.1:5432\"\n"); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	expectChange(t, w, "closed after writing")
}

// In a Kubernetes ConfigMap volume the config is a symlink through
// ..data, which the kubelet swaps by rename to publish a new version:
// that swap is a change.
func TestWatcherSeesAConfigMapUpdate(t *testing.T) {
	dir := t.TempDir()
	publish := func(version, text string) {
		t.Helper()
		ts := filepath.Join(dir, "..2026_12_03_"+version)
		if err := os.Mkdir(ts, 0o755); err != nil {
			t.Fatal(err)
		}
		writeFile(t, filepath.Join(ts, "l4lb.toml"), text)
		if err := os.Symlink(filepath.Base(ts), filepath.Join(dir, "..data_tmp")); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(filepath.Join(dir, "..data_tmp"), filepath.Join(dir, "..data")); err != nil {
			t.Fatal(err)
		}
	}
	publish("1", "a")
	path := filepath.Join(dir, "l4lb.toml")
	if err := os.Symlink("..data/l4lb.toml", path); err != nil {
		t.Fatal(err)
	}
	w := startWatcher(t, path)
	publish("2", "b")
	expectChange(t, w, "..data swapped")
	if b, err := os.ReadFile(path); err != nil || string(b) != "b" {
		t.Fatalf("the config reads %q, %v", b, err)
	}
}

// A config under a symlinked release directory (current -> releases/N):
// swapping the symlink counts, and from then on the new release's file
// is watched, not the old one's.
func TestWatcherFollowsASwappedReleaseDirectory(t *testing.T) {
	root := t.TempDir()
	for _, release := range []string{"a", "b"} {
		if err := os.MkdirAll(filepath.Join(root, "releases", release), 0o755); err != nil {
			t.Fatal(err)
		}
		writeFile(t, filepath.Join(root, "releases", release, "l4lb.toml"), release)
	}
	if err := os.Symlink("releases/a", filepath.Join(root, "current")); err != nil {
		t.Fatal(err)
	}
	w := startWatcher(t, filepath.Join(root, "current", "l4lb.toml"))

	writeFile(t, filepath.Join(root, "releases", "b", "l4lb.toml"), "b2")
	expectNoChange(t, w, "the file of a release not current written")
	// As deploy tools swap it: a new symlink renamed over the old one.
	if err := os.Symlink("releases/b", filepath.Join(root, "current.tmp")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(root, "current.tmp"), filepath.Join(root, "current")); err != nil {
		t.Fatal(err)
	}
	expectChange(t, w, "current swapped to releases/b")
	writeFile(t, filepath.Join(root, "releases", "b", "l4lb.toml"), "b3")
	expectChange(t, w, "the current release's file written")
	writeFile(t, filepath.Join(root, "releases", "a", "l4lb.toml"), "a2")
	expectNoChange(t, w, "the old release's file written")
}

// A config that is a symlink into another directory: the target edited
// there counts, and so does the symlink pointed elsewhere, after which
// the new target is watched instead.
func TestWatcherFollowsASymlinkIntoAnotherDirectory(t *testing.T) {
	etc, srv := t.TempDir(), t.TempDir()
	writeFile(t, filepath.Join(srv, "one.toml"), "1")
	writeFile(t, filepath.Join(srv, "two.toml"), "2")
	path := filepath.Join(etc, "l4lb.toml")
	if err := os.Symlink(filepath.Join(srv, "one.toml"), path); err != nil {
		t.Fatal(err)
	}
	w := startWatcher(t, path)

	writeFile(t, filepath.Join(srv, "one.toml"), "1b")
	expectChange(t, w, "the symlink's target written")
	writeFile(t, filepath.Join(srv, "two.toml"), "2b")
	expectNoChange(t, w, "another file of the target's directory written")
	// As `ln -sfn` does it: removed, then made anew.
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join(srv, "two.toml"), path); err != nil {
		t.Fatal(err)
	}
	expectChange(t, w, "the symlink pointed at two.toml")
	// The removal and the new symlink may have made two changes.
	select {
	case <-w.Changes():
	case <-time.After(quiet):
	}
	writeFile(t, filepath.Join(srv, "one.toml"), "1c")
	expectNoChange(t, w, "the old target written")
	writeFile(t, filepath.Join(srv, "two.toml"), "2c")
	expectChange(t, w, "the new target written")
}

// pathLinks names each symlink a path goes through, in its real
// directory, and where the path ends.
func TestPathLinks(t *testing.T) {
	root := t.TempDir()
	real, err := filepath.EvalSymlinks(root)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(real, "releases", "7"), 0o755); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(real, "releases", "7", "real.toml"), "x")
	if err := os.Symlink("releases/7", filepath.Join(real, "current")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("real.toml", filepath.Join(real, "releases", "7", "l4lb.toml")); err != nil {
		t.Fatal(err)
	}
	got := pathLinks(filepath.Join(real, "current", "l4lb.toml"))
	want := []pathLink{
		{real, "current"},
		{filepath.Join(real, "releases", "7"), "l4lb.toml"},
		{filepath.Join(real, "releases", "7"), "real.toml"},
	}
	if !slices.Equal(got, want) {
		t.Errorf("pathLinks: %v, want %v", got, want)
	}
	if got := pathLinks(filepath.Join(real, "current", "missing", "x.toml")); !slices.Equal(got, []pathLink{{real, "current"}, {filepath.Join(real, "releases", "7"), "missing"}}) {
		t.Errorf("pathLinks of a path whose directory is missing: %v", got)
	}
}
