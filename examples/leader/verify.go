package main

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// logEntry is one log key read back: the term that wrote it and its value.
type logEntry struct {
	term  int64
	value int64
}

// verify reads the counter and the log back from etcd and checks them.
func verify(ctx context.Context, cli *clientv3.Client, prefix string, h *history) (bool, error) {
	counter, entries, err := readLedger(ctx, cli, prefix+"/data")
	if err != nil {
		return false, err
	}
	writes := map[int64]int{}
	for _, e := range entries {
		writes[e.term]++
	}
	problems := checkLog(counter, entries)

	h.mu.Lock()
	leaders := make([]string, 0, len(h.reigns))
	for _, r := range h.reigns {
		leaders = append(leaders, fmt.Sprintf("%s (term %d, %d writes)", r.name, r.term, writes[r.term]))
	}
	h.mu.Unlock()
	fmt.Fprintf(h.out, "leaders: %s\n", strings.Join(leaders, ", "))
	verdict := "OK"
	if len(problems) > 0 {
		verdict = "BROKEN: " + strings.Join(problems, "; ")
	}
	fmt.Fprintf(h.out, "counter: %d, log keys: %d, each value 1..%d once, terms in order (%s)\n",
		counter, len(entries), counter, verdict)
	return len(problems) == 0, nil
}

// readLedger reads the counter and the log entries under data, the entries
// sorted by value.
func readLedger(ctx context.Context, cli *clientv3.Client, data string) (int64, []logEntry, error) {
	resp, err := cli.Get(ctx, data+"/counter")
	if err != nil {
		return 0, nil, err
	}
	var counter int64
	if len(resp.Kvs) == 1 {
		if counter, err = strconv.ParseInt(string(resp.Kvs[0].Value), 10, 64); err != nil {
			return 0, nil, fmt.Errorf("counter: %w", err)
		}
	}
	resp, err = cli.Get(ctx, data+"/log/", clientv3.WithPrefix())
	if err != nil {
		return 0, nil, err
	}
	entries := make([]logEntry, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		rest := strings.TrimPrefix(string(kv.Key), data+"/log/")
		term, err1 := strconv.ParseInt(strings.SplitN(rest, "/", 2)[0], 10, 64)
		value, err2 := strconv.ParseInt(string(kv.Value), 10, 64)
		if err := errors.Join(err1, err2); err != nil {
			return 0, nil, fmt.Errorf("log entry %q: %w", kv.Key, err)
		}
		entries = append(entries, logEntry{term: term, value: value})
	}
	sort.Slice(entries, func(i, j int) bool { return entries[i].value < entries[j].value })
	return counter, entries, nil
}

// checkLog returns what is wrong with the log: entries sorted by value must
// hold every value 1..counter once, in terms that only grow.
func checkLog(counter int64, entries []logEntry) []string {
	var problems []string
	if int64(len(entries)) != counter {
		problems = append(problems, "counter and log differ")
	}
	for i, e := range entries {
		if e.value != int64(i+1) {
			problems = append(problems, fmt.Sprintf("value %d missing or doubled", i+1))
			break
		}
		if i > 0 && e.term < entries[i-1].term {
			problems = append(problems, fmt.Sprintf("value %d written in term %d after term %d", e.value, e.term, entries[i-1].term))
			break
		}
	}
	return problems
}
