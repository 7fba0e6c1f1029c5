// Renders a Go text/template, as Ollama renders a Modelfile's TEMPLATE, for tests/test_gguf.py: reads
// {"template": ..., "system": ..., "messages": [{"Role": ..., "Content": ...}]} as JSON on stdin, writes the text.
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type input struct {
	Template string              `json:"template"`
	System   string              `json:"system"`
	Messages []map[string]string `json:"messages"`
}

func main() {
	var in input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("modelfile").Parse(in.Template))
	if err := tmpl.Execute(os.Stdout, map[string]any{"System": in.System, "Messages": in.Messages}); err != nil {
		panic(err)
	}
}
