package config

import (
	"os"
	"path/filepath"
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
