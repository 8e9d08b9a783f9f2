package node

// Waiting, for the node test and the pods bench alike.

import (
	"context"
	"errors"
	"fmt"
	"time"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// Poll calls cond every interval until it is done, fails for good (an error made
// by Stop) or timeout passes; the timeout error names the last state seen and the
// last error.
func Poll(ctx context.Context, timeout, interval time.Duration, cond func() (done bool, state string, err error)) error {
	deadline := time.Now().Add(timeout)
	var state string
	var lastErr error
	for {
		done, st, err := cond()
		var stop *stopError
		if errors.As(err, &stop) {
			return stop.err
		}
		if err == nil && done {
			return nil
		}
		if st != "" {
			state = st
		}
		lastErr = err
		if time.Now().After(deadline) {
			msg := fmt.Sprintf("not done after %s", timeout)
			if state != "" {
				msg += "; last seen: " + state
			}
			if lastErr != nil {
				msg += fmt.Sprintf("; last error: %v", lastErr)
			}
			return errors.New(msg)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(interval):
		}
	}
}

// stopError ends a poll at once: waiting longer cannot help.
type stopError struct{ err error }

func (e *stopError) Error() string { return e.err.Error() }

// Stop wraps err so that Poll returns it at once instead of waiting on.
func Stop(err error) error { return &stopError{err} }

// ConditionStatus is the status of condition typ of o, or "absent".
func ConditionStatus(o *unstructured.Unstructured, typ string) string {
	conds, _, _ := unstructured.NestedSlice(o.Object, "status", "conditions")
	for _, c := range conds {
		m, _ := c.(map[string]any)
		if m["type"] == typ {
			st, _ := m["status"].(string)
			return st
		}
	}
	return "absent"
}
