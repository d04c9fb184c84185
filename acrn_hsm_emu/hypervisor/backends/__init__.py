"""Where guest accesses come from: scripted workloads or real code under KVM."""
