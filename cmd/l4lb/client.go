package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

	"github.com/l4lb/l4lb/config"
)

// The commands that talk to a running l4lb through its admin endpoint.

var adminClient = &http.Client{Timeout: 30 * time.Second}

func adminURL(addr, path string) string {
	if !strings.Contains(addr, "://") {
		addr = "http://" + addr
	}
	return strings.TrimSuffix(addr, "/") + path
}

func cmdStatus(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("admin", config.DefaultAdminListen, "admin endpoint of the running l4lb")
	raw := fs.Bool("json", false, "print the JSON document as it is")
	if _, code, ok := parseArgs(fs, args, stderr, 0); !ok {
		return code
	}
	resp, err := adminClient.Get(adminURL(*addr, "/status"))
	if err != nil {
		fmt.Fprintf(stderr, "l4lb status: %v (is l4lb running with admin.listen = %q? -admin ADDR names another)\n", err, *addr)
		return 1
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		fmt.Fprintf(stderr, "l4lb status: %s: %v\n", *addr, err)
		return 1
	}
	if resp.StatusCode != http.StatusOK {
		fmt.Fprintf(stderr, "l4lb status: %s answered %s: not an l4lb admin endpoint, or it failed (%.200q)\n", *addr, resp.Status, body)
		return 1
	}
	if *raw {
		stdout.Write(body)
		return 0
	}
	var st statusJSON
	if err := json.Unmarshal(body, &st); err != nil {
		fmt.Fprintf(stderr, "l4lb status: %v\n", err)
		return 1
	}
	printStatus(stdout, st)
	return 0
}

func printStatus(w io.Writer, st statusJSON) {
	fmt.Fprintf(w, "config version %d (hash %.12s), loaded %s; reloads ok %d, failed %d\n",
		st.Version, st.Hash, st.LoadedAt.Format(time.RFC3339), st.ReloadsOK, st.ReloadsFailed)
	if st.LastReloadError != "" {
		label := "last reload error"
		if st.LastReloadOKAt != nil && st.LastReloadErrorAt != nil && st.LastReloadOKAt.After(*st.LastReloadErrorAt) {
			label = fmt.Sprintf("earlier reload error (a reload succeeded since, at %s)", st.LastReloadOKAt.Format(time.RFC3339))
		}
		fmt.Fprintf(w, "%s (%s):\n  %s\n", label, st.LastReloadErrorAt.Format(time.RFC3339),
			strings.ReplaceAll(st.LastReloadError, "\n", "\n  "))
	}
	if st.Stopping {
		fmt.Fprintln(w, "stopping: no service accepts; open connections drain within each drain_timeout")
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SERVICE\tLISTEN\tBACKEND\tWEIGHT\tBACKUP\tHEALTH\tROUTED\tACTIVE\tTOTAL\tFAILED\tDRAINING")
	for _, s := range st.Services {
		for _, b := range s.Backends {
			draining := "no"
			if s.Draining {
				draining = "stopping"
			} else if b.Draining && b.DrainDeadline != nil {
				draining = "until " + b.DrainDeadline.Format(time.TimeOnly)
			} else if !b.Configured {
				draining = "removed"
			}
			routed := "no"
			if b.InRoute {
				routed = "yes"
			}
			backup := "no"
			if b.Backup {
				backup = "yes"
			}
			healthCell := b.Health
			if s.Unchecked {
				healthCell = "no check"
			}
			fmt.Fprintf(tw, "%s\t%s/%s\t%s\t%d\t%s\t%s\t%s\t%d\t%d\t%d\t%s\n", s.Name, s.Listen, s.Protocol, b.Address,
				b.Weight, backup, healthCell, routed, b.Active, b.Total, b.ConnectFailures, draining)
		}
	}
	tw.Flush()
	printRoutingToBackups(w, st.Services)
	printDownReasons(w, st.Services)
	printTurnedAway(w, st.Services)
}

// printRoutingToBackups names, under the table, each service that sends
// its new connections to its backups: the standby serving is the one
// thing an operator of a primary/standby pair must not miss.
func printRoutingToBackups(w io.Writer, services []serviceJSON) {
	for _, s := range services {
		if s.RoutingToBackups {
			fmt.Fprintf(w, "%s routes to its backups: no primary backend is usable\n", s.Name)
		}
	}
}

// printDownReasons says, under the table, why each checked backend that is
// down failed last: its last failed probe, or passive detection.
func printDownReasons(w io.Writer, services []serviceJSON) {
	for _, s := range services {
		for _, b := range s.Backends {
			if !s.Unchecked && b.Health == "down" && b.LastFailure != "" {
				fmt.Fprintf(w, "%s %s down: %s\n", s.Name, b.Address, b.LastFailure)
			}
		}
	}
}

// printTurnedAway lists, per service, the clients and datagrams l4lb
// turned away and why: what an operator looks for when clients complain
// and every backend above says "up".
func printTurnedAway(w io.Writer, services []serviceJSON) {
	for _, s := range services {
		var parts []string
		if s.Refused > 0 {
			parts = append(parts, fmt.Sprintf("no backend %d", s.Refused))
		}
		parts = append(parts, nonZero(s.Rejected)...)
		if s.UDP != nil {
			if s.UDP.FlowsRefused > 0 {
				parts = append(parts, fmt.Sprintf("flows refused %d", s.UDP.FlowsRefused))
			}
			for _, d := range nonZero(s.UDP.Drops) {
				parts = append(parts, "dropped "+d)
			}
		}
		if len(parts) > 0 {
			fmt.Fprintf(w, "%s turned away: %s\n", s.Name, strings.Join(parts, ", "))
		}
	}
}

// nonZero formats the non-zero counts of m as "reason N", by reason.
func nonZero(m map[string]uint64) []string {
	var out []string
	for reason, n := range m {
		if n > 0 {
			out = append(out, fmt.Sprintf("%s %d", reason, n))
		}
	}
	sort.Strings(out)
	return out
}

func cmdReload(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("reload", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("admin", config.DefaultAdminListen, "admin endpoint of the running l4lb")
	pidfile := fs.String("pidfile", "", "send SIGHUP to the process in this file instead of using the admin endpoint")
	if _, code, ok := parseArgs(fs, args, stderr, 0); !ok {
		return code
	}
	adminSet := false
	fs.Visit(func(f *flag.Flag) { adminSet = adminSet || f.Name == "admin" })
	if adminSet && *pidfile != "" {
		fmt.Fprintln(stderr, "l4lb reload: give -admin or -pidfile, not both")
		return 2
	}
	if *pidfile != "" {
		if _, err := signalPidfile(*pidfile, syscall.SIGHUP); err != nil {
			fmt.Fprintf(stderr, "l4lb reload: %v\n", err)
			return 1
		}
		fmt.Fprintln(stdout, "SIGHUP sent; the result is in l4lb's log and `l4lb status`")
		return 0
	}
	// A reload waits for an upgrade under way, up to upgradeTimeout.
	client := &http.Client{Timeout: adminClient.Timeout + upgradeTimeout}
	resp, err := client.Post(adminURL(*addr, "/reload"), "", nil)
	if err != nil {
		fmt.Fprintf(stderr, "l4lb reload: %v\n", err)
		return 1
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		fmt.Fprintf(stderr, "l4lb reload: %s: %v\n", *addr, err)
		return 1
	}
	// l4lb answers 200 with the versions, or 422 with the error; a running
	// l4lb's version is at least 1. Anything else is some other server (or
	// a proxy's error page), whose "success" must not pass for a reload:
	// systemctl reload relies on this exit code.
	var res reloadResult
	jsonErr := json.Unmarshal(body, &res)
	applied := resp.StatusCode == http.StatusOK && res.Error == ""
	rejected := resp.StatusCode == http.StatusUnprocessableEntity && res.Error != ""
	stopping := resp.StatusCode == http.StatusServiceUnavailable && res.Error != ""
	if jsonErr != nil || res.Version == 0 || !(applied || rejected || stopping) {
		fmt.Fprintf(stderr, "l4lb reload: %s answered %s: not an l4lb admin endpoint, or it failed (%.200q)\n", *addr, resp.Status, body)
		return 1
	}
	if stopping {
		fmt.Fprintf(stderr, "l4lb reload: %s\n", res.Error)
		return 1
	}
	if rejected {
		fmt.Fprintf(stderr, "reload rejected, version %d still serving:\n%s\n", res.Version, res.Error)
		return 1
	}
	if res.Version == res.OldVersion {
		fmt.Fprintf(stdout, "config unchanged, version %d\n", res.Version)
		return 0
	}
	fmt.Fprintf(stdout, "reloaded: version %d -> %d: %s\n", res.OldVersion, res.Version, res.Changes)
	return 0
}

// signalPidfile sends sig to the l4lb whose pidfile is path, and returns
// its pid. A pidfile
// no l4lb holds the lock of is stale, left by an l4lb that crashed, was
// killed or could not remove it after dropping privileges: its number may
// now be another program's, so nothing is sent.
func signalPidfile(path string, sig syscall.Signal) (pid int, err error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	content, err := io.ReadAll(io.LimitReader(f, 32))
	if err != nil {
		return 0, err
	}
	text := strings.TrimSpace(string(content))
	// l4lb run holds an exclusive lock on its pidfile for its life
	// (lockPidfile), so a shared one is ours only when no l4lb runs. The
	// l4lb could still exit between this test and the signal; the window is
	// that of one system call, where reading the number alone left it open
	// for as long as the file stayed behind.
	switch err := unix.Flock(int(f.Fd()), unix.LOCK_SH|unix.LOCK_NB); {
	case err == nil:
		if text == "" {
			text = "no process id"
		}
		return 0, fmt.Errorf("%s is stale: no l4lb holds it (it says %q, which may now be another program's process id); nothing was signalled", path, text)
	case !errors.Is(err, unix.EWOULDBLOCK):
		return 0, fmt.Errorf("lock %s: %w", path, err)
	}
	pid, err = strconv.Atoi(text)
	if err != nil || pid <= 0 {
		return 0, errors.New(path + ": no process id in it (is l4lb still starting?)")
	}
	if err := syscall.Kill(pid, sig); err != nil {
		return 0, fmt.Errorf("signal process %d: %w", pid, err)
	}
	return pid, nil
}

// cmdUpgrade has a running l4lb hand over to the binary at its path
// (see "Upgrading the binary" in the README) and says how it ended.
func cmdUpgrade(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("upgrade", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("admin", config.DefaultAdminListen, "admin endpoint of the running l4lb")
	pidfile := fs.String("pidfile", "", "send SIGUSR2 to the process in this file, and watch the file, instead of using the admin endpoint")
	if _, code, ok := parseArgs(fs, args, stderr, 0); !ok {
		return code
	}
	adminSet := false
	fs.Visit(func(f *flag.Flag) { adminSet = adminSet || f.Name == "admin" })
	if adminSet && *pidfile != "" {
		fmt.Fprintln(stderr, "l4lb upgrade: give -admin or -pidfile, not both")
		return 2
	}
	if *pidfile != "" {
		var before time.Time
		if st, err := os.Stat(*pidfile); err == nil {
			before = st.ModTime()
		}
		old, err := signalPidfile(*pidfile, syscall.SIGUSR2)
		if err != nil {
			fmt.Fprintf(stderr, "l4lb upgrade: %v\n", err)
			return 1
		}
		// The old process writes the new pid there once the new one
		// serves; on a failure, its own again.
		for end := time.Now().Add(upgradeTimeout + 5*time.Second); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
			b, err := os.ReadFile(*pidfile)
			pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
			if err == nil && pid > 0 && pid != old {
				fmt.Fprintf(stdout, "upgraded: pid %d serves; pid %d drains its connections and exits\n", pid, old)
				return 0
			}
			if st, serr := os.Stat(*pidfile); err == nil && pid == old && serr == nil && !st.ModTime().Equal(before) {
				fmt.Fprintf(stderr, "upgrade failed, pid %d still serving: its log says why\n", old)
				return 1
			}
		}
		fmt.Fprintf(stderr, "l4lb upgrade: %s still names pid %d after %v: the upgrade failed, and pid %d serves on; its log says why\n",
			*pidfile, old, upgradeTimeout+5*time.Second, old)
		return 1
	}
	client := &http.Client{Timeout: upgradeTimeout + 15*time.Second}
	resp, err := client.Post(adminURL(*addr, "/upgrade"), "", nil)
	if err != nil {
		fmt.Fprintf(stderr, "l4lb upgrade: %v\n", err)
		return 1
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		fmt.Fprintf(stderr, "l4lb upgrade: %s: %v\n", *addr, err)
		return 1
	}
	var res upgradeJSON
	jsonErr := json.Unmarshal(body, &res)
	switch {
	case jsonErr != nil || res.OldPid == 0:
		fmt.Fprintf(stderr, "l4lb upgrade: %s answered %s: not an l4lb admin endpoint, or it failed (%.200q)\n", *addr, resp.Status, body)
		return 1
	case resp.StatusCode == http.StatusOK && res.Error == "" && res.Pid > 0:
		fmt.Fprintf(stdout, "upgraded: pid %d serves; pid %d drains its connections and exits\n", res.Pid, res.OldPid)
		return 0
	case resp.StatusCode == http.StatusUnprocessableEntity && res.Error != "":
		fmt.Fprintf(stderr, "upgrade failed, pid %d still serving: %s\n", res.OldPid, res.Error)
		return 1
	}
	fmt.Fprintf(stderr, "l4lb upgrade: %s answered %s: %s\n", *addr, resp.Status, res.Error)
	return 1
}
