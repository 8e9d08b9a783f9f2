package datapath

// Reading what the operator injected from a rendered manifest: the proxy container's
// args and the app container's env, re-rooted from the pod's volumes into a
// temporary directory so they can run on this machine unchanged otherwise.

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"gopkg.in/yaml.v3"
)

// ProxyContainerName is the name of the container the operator injects.
const ProxyContainerName = "cloud-sql-proxy"

// Container holds the parts of a container spec the data path depends on.
type Container struct {
	Name          string        `yaml:"name"`
	Image         string        `yaml:"image"`
	Command       []string      `yaml:"command"`
	Args          []string      `yaml:"args"`
	Env           []EnvVar      `yaml:"env"`
	VolumeMounts  []VolumeMount `yaml:"volumeMounts"`
	RestartPolicy string        `yaml:"restartPolicy"`
}

// EnvVar is a container env entry; only literal values are understood.
type EnvVar struct {
	Name      string `yaml:"name"`
	Value     string `yaml:"value"`
	ValueFrom any    `yaml:"valueFrom"`
}

// VolumeMount mounts a pod volume into a container.
type VolumeMount struct {
	Name      string `yaml:"name"`
	MountPath string `yaml:"mountPath"`
}

// PodSpec holds the containers of a pod.
type PodSpec struct {
	InitContainers []Container `yaml:"initContainers"`
	Containers     []Container `yaml:"containers"`
}

type object struct {
	Kind     string `yaml:"kind"`
	Metadata struct {
		Name string `yaml:"name"`
	} `yaml:"metadata"`
	Spec struct {
		PodSpec  `yaml:",inline"` // Pod
		Template struct {
			Spec PodSpec `yaml:"spec"`
		} `yaml:"template"` // Deployment
	} `yaml:"spec"`
}

// Workload is the first Deployment or Pod in a manifest carrying the proxy.
type Workload struct {
	Kind, Name string
	Proxy      Container // the injected cloud-sql-proxy (initContainer or container)
	App        Container // the first other container
}

// LoadWorkload reads a multi-document YAML file.
func LoadWorkload(path string) (*Workload, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	dec := yaml.NewDecoder(f)
	for {
		var o object
		err := dec.Decode(&o)
		if errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("%s: no Deployment or Pod with a container or initContainer named %q", path, ProxyContainerName)
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		spec := o.Spec.Template.Spec
		if o.Kind == "Pod" {
			spec = o.Spec.PodSpec
		} else if o.Kind != "Deployment" {
			continue
		}
		w := &Workload{Kind: o.Kind, Name: o.Metadata.Name}
		found := false
		for _, c := range append(spec.InitContainers, spec.Containers...) {
			if c.Name == ProxyContainerName && !found {
				w.Proxy, found = c, true
			}
		}
		if !found {
			continue
		}
		for _, c := range spec.Containers {
			if c.Name != ProxyContainerName {
				w.App = c
				break
			}
		}
		if w.App.Name == "" {
			return nil, fmt.Errorf("%s: %s %s has no app container besides %q", path, o.Kind, o.Metadata.Name, ProxyContainerName)
		}
		return w, nil
	}
}

// reroot moves a path inside one of the container's mounts to root/<volume name>,
// so two containers mounting the same volume see the same local directory.
func reroot(value string, mounts []VolumeMount, root string) string {
	for _, m := range mounts {
		mp := strings.TrimSuffix(m.MountPath, "/")
		if value == mp || strings.HasPrefix(value, mp+"/") {
			return filepath.Join(root, m.Name) + strings.TrimPrefix(value, mp)
		}
	}
	return value
}

// ProxyArgs returns the proxy's args verbatim except that paths inside its volume
// mounts are re-rooted under root and the values of the port flags named in ports
// are replaced (e.g. "--http-port" -> "40123"). Both "--flag=value" and
// "--flag value" forms are handled.
func (w *Workload) ProxyArgs(root string, ports map[string]string) []string {
	var out []string
	args := w.rawArgs()
	for i := 0; i < len(args); i++ {
		arg := args[i]
		name, value, hasValue := strings.Cut(arg, "=")
		if port, ok := ports[name]; ok && strings.HasPrefix(name, "--") {
			if !hasValue && i+1 < len(args) {
				i++ // "--http-port 9801": replace the next arg
				out = append(out, name, port)
				continue
			}
			out = append(out, name+"="+port)
			continue
		}
		if hasValue && strings.HasPrefix(name, "--") {
			out = append(out, name+"="+reroot(value, w.Proxy.VolumeMounts, root))
			continue
		}
		out = append(out, reroot(arg, w.Proxy.VolumeMounts, root))
	}
	return out
}

// rawArgs is what the image's binary receives: a command given in the manifest
// replaces the image entrypoint (/cloud-sql-proxy), so its own args come first.
func (w *Workload) rawArgs() []string {
	if len(w.Proxy.Command) > 1 {
		return append(append([]string(nil), w.Proxy.Command[1:]...), w.Proxy.Args...)
	}
	return w.Proxy.Args
}

// HasFlag reports whether the proxy's args contain --name (either form).
func (w *Workload) HasFlag(name string) bool {
	for _, a := range w.rawArgs() {
		if a == name || strings.HasPrefix(a, name+"=") {
			return true
		}
	}
	return false
}

// literalEnv returns c's env as NAME=value with paths re-rooted under root.
func literalEnv(c Container, root string) ([]string, error) {
	var env []string
	for _, e := range c.Env {
		if e.ValueFrom != nil {
			return nil, fmt.Errorf("container %q: env %s uses valueFrom; only literal values are understood here", c.Name, e.Name)
		}
		env = append(env, e.Name+"="+reroot(e.Value, c.VolumeMounts, root))
	}
	return env, nil
}

// AppEnv is the app container's env, re-rooted under root.
func (w *Workload) AppEnv(root string) ([]string, error) { return literalEnv(w.App, root) }

// ProxyEnv is the proxy container's own env (if any), re-rooted under root.
func (w *Workload) ProxyEnv(root string) ([]string, error) { return literalEnv(w.Proxy, root) }

// Getenv looks a variable up in an env list.
func Getenv(env []string, name string) string {
	for _, kv := range env {
		if k, v, _ := strings.Cut(kv, "="); k == name {
			return v
		}
	}
	return ""
}
